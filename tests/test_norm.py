"""nsa_tutorial.RMSNorm against torch.nn.RMSNorm: numbers, state_dict, errors."""

import pytest
import torch

from nsa_tutorial import RMSNorm, rms_norm


def reference_and_ours(dim, eps=None):
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm(dim, eps=eps)
    torch.nn.init.normal_(theirs.weight)
    ours = RMSNorm(dim, eps=eps)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("eps", [None, 1e-6, 0.1])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 5, 16)])
def test_matches_torch_rmsnorm_float32(shape, eps):
    theirs, ours = reference_and_ours(16, eps)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_gradients_match_torch_rmsnorm():
    theirs, ours = reference_and_ours(8, 1e-5)
    x = torch.randn(4, 8, requires_grad=True)
    grad_theirs = torch.autograd.grad(theirs(x).square().sum(), (x, theirs.weight))
    grad_ours = torch.autograd.grad(ours(x).square().sum(), (x, ours.weight))
    for a, b in zip(grad_ours, grad_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_is_close(dtype):
    theirs, ours = reference_and_ours(32)
    x = torch.randn(4, 32)
    out = ours.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), theirs(x), atol=0.05, rtol=0.02)


def test_state_dict_loads_both_ways():
    theirs, ours = reference_and_ours(12)
    assert list(ours.state_dict()) == ["weight"]
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_functional_normalises_each_row_to_unit_rms():
    x = 5 * torch.randn(6, 64)
    out = rms_norm(x, torch.ones(64), 1e-8)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(6))


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"dim": 0}, ValueError, "dim must be positive, got dim=0"),
        ({"dim": 8.0}, TypeError, "dim must be an int, got dim=8.0"),
        ({"dim": True}, TypeError, "dim must be an int"),
        ({"dim": 8, "eps": 0.0}, ValueError, "eps must be a positive number or None, got eps=0.0"),
    ],
)
def test_bad_configuration(kwargs, error, text):
    with pytest.raises(error, match=text):
        RMSNorm(**kwargs)


def test_wrong_last_dimension_is_named():
    with pytest.raises(ValueError, match=r"RMSNorm\(dim=8\).*size 8, got x of shape \(2, 7\)"):
        RMSNorm(8)(torch.randn(2, 7))
