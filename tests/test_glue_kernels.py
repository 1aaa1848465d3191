"""The glue kernels (rotary, gated sum) equal the PyTorch functions they replace, forward
and backward, on every layout the layer hands them (Triton's interpreter on a CPU)."""

import pytest
import torch
from einops import rearrange
from kernel_checks import DEVICE

from nsa_tutorial.attention import combine_branches
from nsa_tutorial.kernels.glue import gated_sum_triton, rotary_triton
from nsa_tutorial.rotary import apply_rotary, rotary_frequencies


def heads_of_a_projection(b, h, n, d):
    """(b, h, n, d) as the layer's qkv split leaves it: a strided view of (b, n, h d)."""
    return rearrange(torch.randn(b, n, h * d, device=DEVICE), "b n (h d) -> b h n d", d=d)


@pytest.mark.parametrize("d", [16, 24])  # a power of two and not
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
    ],
)  # fmt: skip
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
