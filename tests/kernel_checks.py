"""What the kernel tests share: the device they run on, and how a kernel's output and
gradients are held to a float64 reference in half precision."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there, else interpreted
# relative error ||kernel - reference|| / ||reference|| allowed per dtype (bf16 has 8 bits)
HALF_PRECISION_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_in_half_precision(
    out: torch.Tensor, expected: torch.Tensor, leaves: list[torch.Tensor]
) -> None:
    """out, computed in half precision from `leaves`, against expected, their float64
    reference: the output within the dtype's tolerance, every gradient within twice it,
    and nothing changes dtype."""
    dtype = leaves[0].dtype
    assert out.dtype == dtype
    assert relative_error(out, expected) < HALF_PRECISION_TOLERANCE[dtype]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    for given, actual, wanted in zip(leaves, grads, expected_grads, strict=True):
        assert actual.dtype == given.dtype
        assert relative_error(actual, wanted) < 2 * HALF_PRECISION_TOLERANCE[dtype]
