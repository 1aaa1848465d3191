"""The Triton compressed-attention kernels (notebook 10) against the PyTorch path.

On a machine without a GPU the kernels run in Triton's interpreter, so the shapes are
small; on a GPU the same tests run compiled. The reference is
`nsa_tutorial.compress.compressed_attention` in float64 on the same (rounded) inputs.
Most cases run twice: with the launch table's tiles, and with tiles of 16 rows and 16
keys and each dk, dv walk cut into up to 4 chunks, so that small shapes too walk
several tiles, the unmasked loops and several chunks per key tile.
"""

from dataclasses import replace

import pytest
import torch
from einops import rearrange
from kernel_checks import DEVICE, assert_close_in_half_precision

from nsa_tutorial.compress import compressed_attention as pytorch_path

# nsa_tutorial.kernels decides on the interpreter before Triton is imported (macOS: skip)
kernels = pytest.importorskip("nsa_tutorial.kernels.compressed")
compressed_attention = kernels.compressed_attention

SMALL_TILES = dict(block_m=16, block_n=16, num_warps=2, num_stages=1, rows_per_program=16,
                   chunks=4)


@pytest.fixture(params=["table", "small"], ids=["table-tiles", "small-tiles"])
def tiles(request, monkeypatch):
    """The launch table as it is, or every kernel on SMALL_TILES."""
    if request.param == "small":
        for name, launch in kernels.LAUNCH.items():
            monkeypatch.setitem(kernels.LAUNCH, name, replace(launch, **SMALL_TILES))
    return request.param


def random_problem(b, hk, group, n, d, stride, num_memory, dtype, seed, extra_keys=0):
    """q (b, hk * group, n, d) and memory + compressed keys and values (b, hk, m + w, d),
    w = n // stride as SparseAttention makes them (plus extra_keys)."""
    g = torch.Generator().manual_seed(seed)
    num_keys = num_memory + n // stride + extra_keys
    shapes = [(b, hk * group, n, d), (b, hk, num_keys, d), (b, hk, num_keys, d)]
    return [torch.randn(*shape, generator=g).to(dtype).to(DEVICE) for shape in shapes]


def reference(q, ck, cv, num_memory, stride, causal, scale=None):
    """The PyTorch path's output in float64."""
    q, ck, cv = (t.double() for t in (q, ck, cv))
    return pytorch_path(q, ck, cv, num_memory, stride, causal, scale)[0]


def assert_matches_reference(inputs, num_memory, stride, causal, scale=None):
    """Output and the gradients of q, ck, cv (float32) against the float64 PyTorch path."""
    leaves = [t.requires_grad_() for t in inputs]
    out = compressed_attention(*leaves, num_memory=num_memory, stride=stride, causal=causal,
                               scale=scale)
    expected = reference(*leaves, num_memory, stride, causal, scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    for name, actual, wanted in zip(["q", "ck", "cv"], grads, expected_grads, strict=True):
        torch.testing.assert_close(
            actual, wanted, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}"
        )


CASES = [
    # hk, group, n, d, stride, num_memory
    (2, 1, 37, 16, 4, 1),  # no GQA, n not a multiple of the stride
    (1, 2, 29, 24, 5, 2),  # head dim and stride not powers of two, two memory tokens
    (1, 3, 50, 16, 2, 2),  # a group that is no power of two: tiles cut through groups
    (1, 4, 40, 16, 8, 1),
    (1, 16, 12, 16, 4, 1),  # the paper's group of 16
    (2, 2, 6, 16, 8, 1),  # shorter than a stride: only the memory is visible
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"hk{c[0]}-g{c[1]}-n{c[2]}-d{c[3]}-s{c[4]}-m{c[5]}"
)
def test_forward_and_gradients_match_pytorch(case, causal, tiles):
    hk, group, n, d, stride, num_memory = case
    inputs = random_problem(2, hk, group, n, d, stride, num_memory, torch.float32, seed=n + d)
    assert_matches_reference(inputs, num_memory, stride, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
def test_half_precision(dtype, causal, monkeypatch):
    for name, launch in kernels.LAUNCH.items():  # several tiles of each kind
        monkeypatch.setitem(kernels.LAUNCH, name, replace(launch, **SMALL_TILES))
    inputs = random_problem(1, 2, 2, 45, 32, 3, 1, dtype, seed=3)
    leaves = [t.requires_grad_() for t in inputs]
    out = compressed_attention(*leaves, num_memory=1, stride=3, causal=causal)
    assert_close_in_half_precision(out, reference(*leaves, 1, 3, causal), leaves)


@pytest.mark.parametrize("d", [64, 256])
def test_wide_heads_and_a_scale(d):
    inputs = random_problem(1, 1, 2, 20, d, 4, 1, torch.float32, seed=5)
    assert_matches_reference(inputs, 1, 4, True, scale=0.3)


def test_keys_past_the_sequence_and_strided_inputs():
    """Causal: compressed keys of blocks that end after the last token get no weight and
    no gradient. Inputs that are views with other strides give the same numbers."""
    q, ck, cv = random_problem(1, 2, 2, 20, 16, 4, 1, torch.float32, seed=7, extra_keys=3)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not q.is_contiguous()
    assert_matches_reference([q, ck, cv], 1, 4, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "not-causal"])
def test_query_heads_read_in_place_from_a_projection(causal, tiles):
    """q as the layer makes it, the query heads of a wider qkv projection (b, n, width)
    seen as (b, h, n, d): read in place, not copied, with the same numbers."""
    q, ck, cv = random_problem(2, 2, 3, 23, 16, 4, 1, torch.float32, seed=11)
    projection = torch.randn(2, 23, 6 * 16 + 40, device=DEVICE)
    projection[..., : 6 * 16] = rearrange(q, "b h n d -> b n (h d)")
    q = rearrange(projection[..., : 6 * 16], "b n (h d) -> b h n d", d=16)
    assert q.stride() == (23 * 136, 16, 136, 1)
    assert_matches_reference([q, ck, cv], 1, 4, causal)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"q": torch.randn(4, 10, 16)}, ValueError, r"q must be \(b, h, n, d\), got shape"),
        ({"ck": torch.randn(1, 2, 5, 32)}, ValueError,
         r"ck must be \(b, hk, m \+ w, d\) = \(1, hk, m \+ w, 16\)"),
        ({"cv": torch.randn(1, 2, 6, 16)}, ValueError, "ck and cv must have the same shape"),
        ({"q": torch.randn(1, 4, 10, 16).double()}, TypeError, "q must be float32"),
        ({"ck": torch.randn(1, 2, 5, 16).half()}, TypeError, "must share a dtype"),
        ({"q": torch.randn(1, 4, 0, 16)}, ValueError, r"q must not be empty, got shape"),
        ({"q": torch.randn(1, 3, 10, 16)}, ValueError,
         "multiple of the kv heads, got hq=3, hk=2"),
        ({"stride": 0}, ValueError, "stride must be positive, got stride=0"),
        ({"stride": 2.0}, TypeError, "stride must be an int"),
        ({"num_memory": 0}, ValueError,
         r"num_memory must be between 1 and the keys' length m \+ w=5 .* got num_memory=0"),
        ({"num_memory": 6}, ValueError, "got num_memory=6"),
        ({"num_memory": 1.0}, TypeError, "num_memory must be an int"),
        ({"causal": 1}, TypeError, "causal must be a bool, got causal=1"),
        ({"scale": torch.tensor(0.5)}, TypeError, "scale must be a number or None"),
        ({"cv": torch.randn(1, 2, 5, 16, device="meta")}, ValueError,
         "q, ck and cv must be on one device"),
    ],
)
def test_bad_input_is_named(change, error, message):
    args = {
        "q": torch.randn(1, 4, 10, 16),
        "ck": torch.randn(1, 2, 5, 16),
        "cv": torch.randn(1, 2, 5, 16),
        "num_memory": 1,
        "stride": 2,
        "causal": True,
    }
    args.update(change)
    if "ck" in change:
        args["cv"] = args["ck"]
    with pytest.raises(error, match=message):
        compressed_attention(**args)


@pytest.mark.parametrize("d", [8, 272])
def test_head_dim_bounds(d):
    q = torch.randn(1, 1, 4, d)
    with pytest.raises(ValueError, match=f"between 16 and 256, got d={d}"):
        compressed_attention(q, q, q, num_memory=1, stride=2, causal=True)


def test_exported_from_kernels():
    import nsa_tutorial.kernels

    assert nsa_tutorial.kernels.compressed_attention is compressed_attention


def test_cpu_tensors_with_a_compiling_triton(monkeypatch):
    import nsa_tutorial.kernels

    monkeypatch.setattr(nsa_tutorial.kernels, "triton_mode", lambda: "compiled")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="move the tensors to the GPU"):
        compressed_attention(q, q, q, num_memory=1, stride=2, causal=True)
