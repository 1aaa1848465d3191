"""The one-pass Triton top-n (notebook 10) against `top_blocks_from_keys`, the PyTorch path.

Without a GPU the kernel runs in Triton's interpreter, so the shapes are small; each case
runs with the module's tiles and with 16 x 16 tiles, so that short sequences too walk
several tiles of blocks and several query tiles.
"""

import pytest
import torch
from grids import IMPORTANCE_CASES
from kernel_checks import DEVICE

from nsa_tutorial.kernels.importance import top_blocks_from_keys

kernels = pytest.importorskip("nsa_tutorial.kernels.top_blocks")
top_blocks_kernel = kernels.top_blocks_kernel


@pytest.fixture(params=["module", "small"], ids=["module-tiles", "small-tiles"])
def tiles(request, monkeypatch):
    """The module's tiles, or 16 queries by 16 blocks."""
    if request.param == "small":
        monkeypatch.setattr(kernels, "BLOCK_M", 16)
        monkeypatch.setattr(kernels, "BLOCK_N", 16)
    return request.param


def problem(b, heads, kv_heads, n, d, stride, dtype=torch.float32, seed=0):
    """Random q (b, heads, n, d) and compressed keys ck (b, kv_heads, n // stride, d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=g).to(dtype).to(DEVICE)
    ck = torch.randn(b, kv_heads, n // stride, d, generator=g).to(dtype).to(DEVICE)
    return q, ck


def assert_same_top(got, expected):
    """Equal probabilities, and equal blocks wherever a block is selected (> 1e-10); hidden
    blocks (probability 0) may be listed in another order."""
    (values, indices), (want_values, want_indices) = got, expected
    assert values.dtype == torch.float32 and indices.dtype == torch.long
    torch.testing.assert_close(values, want_values, atol=1e-6, rtol=1e-5)
    selected = want_values > 1e-10
    assert torch.equal(values > 1e-10, selected)
    assert torch.equal(indices[selected], want_indices[selected])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "shared"), [(4, 2, True), (4, 2, False), (3, 1, True)]
)
@pytest.mark.parametrize(("stride", "selection_block", "interpolate"), IMPORTANCE_CASES)
@pytest.mark.parametrize("n", [37, 130])
def test_top_blocks_kernel_equals_the_pytorch_path(
    tiles, causal, heads, kv_heads, shared, stride, selection_block, interpolate, n
):
    q, ck = problem(2, heads, kv_heads, n, 16, stride, seed=n + stride)
    settings = dict(
        num_selected=3, stride=stride, selection_block=selection_block,
        group_size=heads // kv_heads if shared else None, interpolate=interpolate,
        causal=causal, scale=0.3,
    )  # fmt: skip
    got = top_blocks_kernel(q, ck, **settings)
    assert_same_top(got, top_blocks_from_keys(q, ck, **settings))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [24, 64])
def test_top_blocks_kernel_reads_half_precision_and_any_head_dim(dtype, d):
    """Half-precision q and keys are read as the PyTorch path reads them (in float32),
    for head dims that are and are not powers of two, 16 picks of many blocks."""
    q, ck = problem(1, 8, 2, 300, d, 4, dtype, seed=d)
    settings = dict(num_selected=16, stride=4, selection_block=8, group_size=4,
                    interpolate=False, causal=True, scale=d**-0.5)  # fmt: skip
    got = top_blocks_kernel(q, ck, **settings)
    assert_same_top(got, top_blocks_from_keys(q, ck, **settings))


def test_ties_go_to_the_lower_block():
    """Equal scores (keys of zeros) rank by block number, lowest first; the visible ones
    share the probability that the sink leaves them."""
    q, _ = problem(1, 2, 1, 64, 16, 4)
    ck = torch.zeros(1, 1, 16, 16, device=DEVICE)
    values, indices = top_blocks_kernel(
        q, ck, num_selected=4, stride=4, selection_block=4, group_size=2,
        interpolate=False, causal=False, scale=1.0,
    )  # fmt: skip
    assert torch.equal(indices.cpu(), torch.arange(4).expand(1, 1, 64, 4))
    torch.testing.assert_close(values.cpu(), torch.full((1, 1, 64, 4), 1 / 16))


def test_fewer_blocks_than_picks_and_none_at_all():
    """num_selected past the w' blocks gives all w' (as topk of min(n, w')); a sequence
    shorter than one block gives empty (values, indices), as the PyTorch path does."""
    q, ck = problem(1, 2, 1, 20, 16, 4)
    settings = dict(num_selected=16, stride=4, selection_block=8, group_size=2,
                    interpolate=False, causal=True, scale=0.25)  # fmt: skip
    values, indices = top_blocks_kernel(q, ck, **settings)
    assert values.shape == indices.shape == (1, 1, 20, 2)
    assert_same_top((values, indices), top_blocks_from_keys(q, ck, **settings))
    q, ck = problem(1, 2, 1, 7, 16, 8)
    values, indices = top_blocks_kernel(q, ck, **settings)
    assert values.shape == indices.shape == (1, 1, 7, 0)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(q=torch.zeros(1, 2, 8, 16, dtype=torch.float64)), TypeError, "q must be float32"),
        (dict(ck=torch.zeros(2, 4, 16)), ValueError, r"ck must be \(b, h, n, d\)"),
        (dict(ck=torch.zeros(1, 3, 2, 16)), ValueError, "hk >= 1 dividing q's heads"),
        (dict(num_selected=-1), ValueError, "num_selected must be >= 0"),
        (dict(num_selected=2.0), TypeError, "num_selected must be an int"),
        (dict(stride=0), ValueError, "stride must be positive"),
        (dict(selection_block=-4), ValueError, "selection_block must be positive"),
        (dict(ck=torch.zeros(1, 0, 2, 16)), ValueError, "hk >= 1 dividing"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(scale=None), TypeError, "scale must be a number"),
        (dict(num_selected=65), ValueError, "num_selected must be at most 64 for the one-pass"),
        (dict(group_size=1), ValueError, r"group_size must be None or the query heads per kv"),
    ],
)
def test_bad_input_is_named(change, error, message):
    settings = dict(q=torch.zeros(1, 2, 8, 16), ck=torch.zeros(1, 1, 2, 16), num_selected=2,
                    stride=4, selection_block=4, group_size=2, interpolate=False, causal=True,
                    scale=0.25)  # fmt: skip
    settings.update(change)
    settings = {name: t.to(DEVICE) if torch.is_tensor(t) else t for name, t in settings.items()}
    with pytest.raises(error, match=message):
        top_blocks_kernel(**settings)


def test_precision_follows_the_models_dtype():
    """float32 models score in full precision; half precision with tf32x3 (the interpreter
    multiplies in numpy whatever it is told, so this pins the choice itself)."""
    assert kernels._precision(torch.float32) == "ieee"
    assert kernels._precision(torch.bfloat16) == kernels._precision(torch.float16) == "tf32x3"


def test_no_picks():
    """num_selected=0 (SparseAttention allows it: the own block only) gives (..., 0)."""
    q, ck = problem(1, 2, 1, 40, 16, 4)
    values, indices = top_blocks_kernel(
        q, ck, num_selected=0, stride=4, selection_block=4, group_size=2, interpolate=False,
        causal=True, scale=0.25,
    )  # fmt: skip
    assert values.shape == indices.shape == (1, 1, 40, 0)


def test_the_most_blocks_the_kernel_keeps():
    """MAX_SELECTED picks (64) of 75 blocks, several tiles of them: the longest merges."""
    q, ck = problem(1, 2, 1, 300, 16, 4, seed=4)
    settings = dict(num_selected=kernels.MAX_SELECTED, stride=4, selection_block=4,
                    group_size=2, interpolate=False, causal=True, scale=0.25)  # fmt: skip
    got = top_blocks_kernel(q, ck, **settings)
    assert_same_top(got, top_blocks_from_keys(q, ck, **settings))


def test_layer_takes_the_pytorch_path_past_the_kernels_limit(monkeypatch):
    """More picks than the kernel keeps: SparseAttention scores the blocks in PyTorch."""
    from nsa_tutorial import SparseAttention

    def must_not_run(*args, **kwargs):
        raise AssertionError("top_blocks_kernel ran past MAX_SELECTED")

    monkeypatch.setattr(kernels, "MAX_SELECTED", 1)
    monkeypatch.setattr(kernels, "top_blocks_kernel", must_not_run)
    model = SparseAttention(
        dim=32, dim_head=16, heads=2, kv_heads=1, sliding_window_size=4, compress_block_size=4,
        compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=2,
        use_triton_kernel=True,
    )  # fmt: skip
    q, ck = problem(1, 2, 1, 40, 16, 4)
    with torch.no_grad():
        values, indices = model.kernel_top_blocks(q.cpu(), ck.cpu())
    assert values.shape == indices.shape == (1, 1, 40, 2)


def test_layer_with_no_picks_on_the_kernel_path():
    """SparseAttention with num_selected_blocks=0 (the own block only) runs its kernel path
    without gradients, as its PyTorch path does."""
    from nsa_tutorial import SparseAttention

    torch.manual_seed(0)
    model = SparseAttention(
        dim=32, dim_head=16, heads=2, kv_heads=1, sliding_window_size=4, compress_block_size=4,
        compress_block_sliding_stride=4, selection_block_size=4, num_selected_blocks=0,
        use_triton_kernel=True,
    ).to(DEVICE)  # fmt: skip
    x = torch.randn(1, 21, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, disable_triton_kernel=True))
