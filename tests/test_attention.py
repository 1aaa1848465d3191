"""The assembled SparseAttention: the reference's weights, numbers and gradients; errors."""

import contextlib
import io
import warnings

import pytest
import torch
from grids import MODULE_PARITY, config_id
from native_sparse_attention_pytorch import SparseAttention as Reference
from torch.utils._python_dispatch import TorchDispatchMode

from nsa_tutorial import SparseAttention


def pair(config, seed=0):
    """A reference module with non-trivial weights, and ours loaded from its state_dict."""
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Reference(**config)
        ours = SparseAttention(**config)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def gradients(model, x, out, weights, names):
    """Gradients of mean(out * weights) for x and the named parameters (zeros where unused)."""
    params = dict(model.named_parameters())
    inputs = [x, *(params[name] for name in names)]
    grads = torch.autograd.grad((out * weights).mean(), inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs, strict=True)]


@pytest.mark.parametrize("config", MODULE_PARITY, ids=config_id)
def test_outputs_and_gradients_equal_the_reference(config):
    reference, ours = pair(config)
    names = [name for name, p in reference.named_parameters() if p.requires_grad]
    four_times = config["selection_block_size"] == 4 * config["compress_block_sliding_stride"]
    for n in (1, 5, 17, 40, 300) if four_times else (1, 5, 17, 40):
        x = torch.randn(2, n, 16, requires_grad=True)
        expected, got = reference(x), ours(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        weights = torch.randn_like(expected)
        for name, a, b in zip(
            ["x", *names],
            gradients(reference, x, expected, weights, names),
            gradients(ours, x, got, weights, names),
            strict=True,
        ):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}, n={n}")


def test_state_dict_round_trip_and_defaults():
    config = MODULE_PARITY[0]
    reference, ours = pair(config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    default = SparseAttention(
        dim=16,
        dim_head=8,
        heads=2,
        sliding_window_size=4,
        compress_block_size=8,
        selection_block_size=8,
        num_selected_blocks=1,
    )
    assert default.compress_block_sliding_stride == 8
    bias = default.to_strategy_combine[0].bias.reshape(2, 3)
    assert bias.tolist() == [[-2.0, -2.0, 2.0]] * 2
    assert default.to_strategy_combine[0].weight.abs().max() == 0


BASE = dict(
    dim=16,
    dim_head=8,
    heads=4,
    sliding_window_size=4,
    compress_block_size=8,
    compress_block_sliding_stride=4,
    selection_block_size=8,
    num_selected_blocks=2,
)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"heads": 4, "kv_heads": 3},
            ValueError,
            "heads must be a multiple of kv_heads .* heads=4, kv_heads=3",
        ),
        ({"kv_heads": 8}, ValueError, "kv_heads <= heads.*heads=4, kv_heads=8"),
        ({"dim": 0}, ValueError, "dim must be positive, got dim=0"),
        ({"dim_head": 8.0}, TypeError, "dim_head must be an int, got dim_head=8.0"),
        ({"sliding_window_size": -1}, ValueError, "sliding_window_size must be positive"),
        ({"compress_block_size": 0}, ValueError, "compress_block_size must be positive"),
        (
            {"compress_block_sliding_stride": 16},
            ValueError,
            "compress_block_sliding_stride must be <= compress_block_size, "
            "got compress_block_sliding_stride=16",
        ),
        (
            {"selection_block_size": 6},
            ValueError,
            "selection_block_size must be a multiple of compress_block_sliding_stride "
            "unless interpolated",
        ),
        (
            {"num_compressed_mem_kv": 0},
            ValueError,
            "num_compressed_mem_kv must be positive, got num_compressed_mem_kv=0",
        ),
        (
            {"num_selected_blocks": -1},
            ValueError,
            "num_selected_blocks must be an int >= 0, got num_selected_blocks=-1",
        ),
        ({"selection_block_size": None}, TypeError, "SparseAttention needs selection_block_size"),
    ],
)
def test_bad_configuration(change, error, message):
    with pytest.raises(error, match=message):
        SparseAttention(**{**BASE, **change})


def test_triton_kernel_needs_triton(monkeypatch):
    monkeypatch.setattr("nsa_tutorial.attention.TRITON_AVAILABLE", False)
    with pytest.raises(ValueError, match="use_triton_kernel=True needs Triton, which is not"):
        SparseAttention(**{**BASE, "use_triton_kernel": True})


def test_interpolation_allows_any_selection_block():
    model = SparseAttention(
        **{**BASE, "selection_block_size": 6, "interpolated_importance_score": True}
    )
    assert model(torch.randn(1, 20, 16)).shape == (1, 20, 16)


def test_zero_selected_blocks_warns():
    with pytest.warns(UserWarning, match="num_selected_blocks=0"):
        SparseAttention(**{**BASE, "num_selected_blocks": 0})


@pytest.mark.parametrize(
    ("inp", "error", "message"),
    [
        (
            torch.randn(2, 16),
            ValueError,
            r"shape \(batch, seq_len, dim\), got inp of shape \(2, 16\)",
        ),
        (
            torch.randn(2, 5, 12),
            ValueError,
            r"last dimension must equal dim=16, got inp of shape \(2, 5, 12\)",
        ),
        (
            torch.ones(2, 5, 16, dtype=torch.long),
            TypeError,
            "floating-point tensor, got dtype torch.int64",
        ),
        (torch.randn(2, 0, 16), ValueError, "at least one token"),
        ([[0.0] * 16], TypeError, "inp must be a torch.Tensor, got list"),
    ],
)
def test_bad_input(inp, error, message):
    with pytest.raises(error, match=message):
        SparseAttention(**BASE)(inp)


def test_forward_takes_the_reference_arguments_in_order():
    model = SparseAttention(**(BASE | {"causal": True}))
    x = torch.randn(1, 10, 16)
    out, cache = model(x, None, True, None, None, True)  # cache, disable_triton_kernel, ...
    torch.testing.assert_close(out, model(x))
    assert len(cache) == 2


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("interpolate", [False, True])
def test_no_tensor_as_large_as_queries_times_compressed_blocks(interpolate):
    """The compressed branch and importance go in query chunks: one head, 2,048 tokens
    and stride 4 never make a tensor of 2,048 x 512 elements, forward or backward."""
    model = SparseAttention(
        dim=16, dim_head=16, heads=1, sliding_window_size=16, compress_block_size=8,
        compress_block_sliding_stride=4, selection_block_size=8 if not interpolate else 6,
        num_selected_blocks=4, causal=True, interpolated_importance_score=interpolate,
    )  # fmt: skip
    x = torch.randn(1, 2048, 16, requires_grad=True)
    with LargestTensor() as largest:
        model(x).sum().backward()
    assert 0 < largest.numel < 2048 * (2048 // 4)
