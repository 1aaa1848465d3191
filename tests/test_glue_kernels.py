"""The glue kernels (RMSNorm, rotary, gated sum) equal the PyTorch functions they replace, forward
and backward, on every layout the layer hands them (Triton's interpreter on a CPU)."""

import pytest
import torch
from einops import rearrange
from kernel_checks import DEVICE

from nsa_tutorial.attention import combine_branches
from nsa_tutorial.kernels.glue import gated_sum_triton, rms_norm_triton, rotary_triton
from nsa_tutorial.norm import RMSNorm
from nsa_tutorial.rotary import apply_rotary, rotary_frequencies


def heads_of_a_projection(b, h, n, d):
    """(b, h, n, d) as the layer's qkv split leaves it: a strided view of (b, n, h d)."""
    return rearrange(torch.randn(b, n, h * d, device=DEVICE), "b n (h d) -> b h n d", d=d)


@pytest.mark.parametrize("d", [16, 24, 96])  # a power of two and not (96: 48 of 64 pairs)
@pytest.mark.parametrize("offset", [0, 37])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rotary_equals_apply_rotary(d, offset, layout):
    torch.manual_seed(d + offset)
    freqs = rotary_frequencies(d).to(DEVICE)
    if layout == "strided":
        x = heads_of_a_projection(2, 3, 45, d)
    else:
        x = torch.randn(2, 3, 45, d, device=DEVICE)
    x.requires_grad_()
    got, want = rotary_triton(x, freqs, offset), apply_rotary(x, freqs, offset)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(want)
    (d_got,) = torch.autograd.grad(got, x, grad)
    (d_want,) = torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(d_got, d_want, atol=2e-6, rtol=1e-5)


def test_rotary_keeps_half_precision():
    x = torch.randn(1, 2, 40, 16, device=DEVICE).to(torch.bfloat16)
    freqs = rotary_frequencies(16).to(DEVICE)
    got = rotary_triton(x, freqs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, apply_rotary(x, freqs))  # within bfloat16's rounding


def random_norm(dim, dtype=torch.float32, eps=None):
    """An RMSNorm(dim) with a random gain, in dtype."""
    norm = RMSNorm(dim, eps=eps)
    torch.nn.init.normal_(norm.weight)
    return norm.to(DEVICE, dtype)


def assert_norm_matches(norm, x, x_leaf, d_out):
    """rms_norm_triton(x) equals norm(x), and so do the gradients of x_leaf and the gain
    (float32 to rounding; half precision once rounded, as RMSNorm rounds)."""
    eps = norm.eps_for(x.dtype)
    got, want = rms_norm_triton(x, norm.weight, eps), norm(x)
    assert got.dtype == x.dtype and got.is_contiguous()
    tight = dict(atol=1e-5, rtol=1e-5) if x.dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tight)
    leaves = (x_leaf, norm.weight)
    for name, d_got, d_want in zip(
        ("x", "weight"),
        torch.autograd.grad(got, leaves, d_out),
        torch.autograd.grad(want, leaves, d_out),
        strict=True,
    ):
        assert d_got.dtype == d_want.dtype
        torch.testing.assert_close(d_got, d_want, **tight, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 96, 2000])  # 96 and 2000: part of the block is masked
@pytest.mark.parametrize("leading", [(2, 5), (7,)], ids=["b-n-dim", "n-dim"])
def test_rms_norm_equals_rmsnorm(leading, dim, dtype):
    torch.manual_seed(dim)
    norm = random_norm(dim, dtype, eps=1e-5)
    x = torch.randn(*leading, dim, device=DEVICE).to(dtype).requires_grad_()
    assert_norm_matches(norm, x, x, torch.randn_like(x))


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_rms_norm_reads_strided_rows(layout):
    """Rows further apart than dim (a slice of a wider tensor) or features not adjacent
    (a transpose, copied first); the machine-epsilon default; a strided upstream gradient."""
    torch.manual_seed(0)
    if layout == "sliced":
        leaf = torch.randn(3, 4, 48, device=DEVICE, requires_grad=True)
        x = leaf[..., :40]  # (3, 4, 40), rows 48 apart
    else:
        leaf = torch.randn(40, 12, device=DEVICE, requires_grad=True)
        x = leaf.t()  # (12, 40), features 12 apart
    d_out = torch.randn(40, *x.shape[:-1], device=DEVICE).movedim(0, -1)
    assert_norm_matches(random_norm(40), x, leaf, d_out)


def test_rms_norm_needs_a_float_input():
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        rms_norm_triton(torch.ones(2, 8, dtype=torch.long), torch.ones(8), 1e-5)


@pytest.mark.parametrize("d", [16, 24])
def test_gated_sum_equals_combine_branches(d):
    torch.manual_seed(d)
    b, h, n = 2, 3, 37
    gates = torch.rand(b, n, h * 3, device=DEVICE)
    gates = rearrange(gates, "b n (h branch) -> b h n branch", h=h).requires_grad_()
    compressed = torch.randn(b, h, n, d, device=DEVICE, requires_grad=True)
    selected = heads_of_a_projection(b, h, n, d).requires_grad_()
    sliding = torch.randn(b, h, n, d, device=DEVICE, requires_grad=True)
    inputs = (gates, compressed, selected, sliding)
    got = gated_sum_triton(*inputs)
    want = rearrange(combine_branches(*inputs), "b h n d -> b n (h d)")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(want)
    for name, d_got, d_want in zip(
        ("gates", "compressed", "selected", "sliding"),
        torch.autograd.grad(got, inputs, grad),
        torch.autograd.grad(want, inputs, grad),
        strict=True,
    ):
        torch.testing.assert_close(d_got, d_want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rotary_triton(torch.randn(3, 10, 16), rotary_frequencies(16)),
         r"x must have shape \(b, h, n, d\)"),
        (lambda: rotary_triton(torch.randn(1, 3, 10, 16), rotary_frequencies(8)),
         r"2 \* len\(freqs\), got d=16, len\(freqs\)=4"),
        (lambda: gated_sum_triton(torch.rand(1, 2, 5, 3), *[torch.randn(1, 2, 5, 8)] * 2,
                                  torch.randn(1, 2, 6, 8)),
         r"got sliding \(1, 2, 6, 8\)"),
        (lambda: gated_sum_triton(torch.rand(1, 2, 5, 2), *[torch.randn(1, 2, 5, 8)] * 3),
         r"gates must be \(b, h, n, 3\) = \(1, 2, 5, 3\), got \(1, 2, 5, 2\)"),
        (lambda: rms_norm_triton(torch.randn(2, 3, 8), torch.ones(6), 1e-5),
         r"weight must be 1-D of size x.shape\[-1\] = 8, got weight of shape \(6,\)"),
        (lambda: rms_norm_triton(torch.randn(3, 8), torch.ones(1, 8), 1e-5),
         r"got weight of shape \(1, 8\)"),
        (lambda: rms_norm_triton(torch.randn(3, 8), torch.ones(8, device="meta"), 1e-5),
         r"x and weight must be on one device, got \['cpu', 'meta'\]"),
        (lambda: rms_norm_triton(torch.randn(3, 8), torch.ones(8), 0.0),
         r"eps must be positive, got eps=0.0"),
        (lambda: rms_norm_triton(torch.randn(0, 8), torch.ones(8), 1e-5),
         r"x must be a non-empty \(..., dim\) tensor, got shape \(0, 8\)"),
    ],
)  # fmt: skip
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
