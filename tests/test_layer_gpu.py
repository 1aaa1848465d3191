"""The whole layer with its kernels equals the PyTorch path on a GPU (skipped without one).

float32: the kernels multiply in full precision, so both paths pick the same blocks and
agree closely. bfloat16: half precision moves some top-n picks, so both paths are held to
the float32 reference, the kernels no further from it than the PyTorch path (forward
and every gradient).
"""

import pytest
import torch
from kernel_checks import relative_error

from nsa_tutorial import SparseAttention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOAT32_TOLERANCE = 1e-4  # relative, over a whole tensor
# ... except the memory tokens: every query sees them, so their gradient sums n * G terms
# that nearly cancel (softmax), added by the compressed kernel's float32 atomics in any
# order; 1.2e-4 seen once (non-causal, G = 1, H200, 2026-11-29)
FLOAT32_CANCELLING = {"compress_mem_kv": 1e-3}
# bfloat16: the kernels' error against float32 at most this times the PyTorch path's
# (sums like the compression MLP's bias gradient lose ~10% in both; 1.85x seen on an H200)
BFLOAT16_FACTOR = 2.0
# ... except the key compression MLP's last bias. Its gradient is the sum of the
# compressed keys' gradients, and the gradients of the keys one query sees sum to ~0
# (softmax), so it is a small remainder of large terms. In bfloat16 the PyTorch path
# loses 4-23% of it and the kernels 1.55-2.25x that (non-causal, H200, 2026-11-29).
CANCELLING = {"k_compress.3.bias": 3.0}


def outputs_and_gradients(model, x, **kwargs):
    x = x.detach().requires_grad_()
    out = model(x, **kwargs)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape))
    grads = [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]
    model.zero_grad()
    return [out, *grads]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [4, 8, 16, 32, 64])  # GQA groups 1, 2, 4, 8, 16 (4 kv heads)
@pytest.mark.parametrize("n", [1000, 2100])  # not multiples of the blocks or the window
def test_kernel_path_equals_pytorch_path(causal, heads, n):
    torch.manual_seed(n + heads)
    model = SparseAttention(
        dim=256, dim_head=64, heads=heads, kv_heads=4, sliding_window_size=128,
        compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
        num_selected_blocks=4, causal=causal, use_triton_kernel=True,
    ).cuda()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, n, 256, device="cuda")
    reference = outputs_and_gradients(model, x, disable_triton_kernel=True)
    fast = outputs_and_gradients(model, x)
    names = ["output", "d input", *(n for n, p in model.named_parameters() if p.requires_grad)]
    errors = {n: relative_error(a, b) for n, a, b in zip(names, fast, reference, strict=False)}
    too_far = {n: e for n, e in errors.items() if e >= FLOAT32_CANCELLING.get(n, FLOAT32_TOLERANCE)}
    assert not too_far, errors
    model = model.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    half_pytorch = outputs_and_gradients(model, x, disable_triton_kernel=True)
    half = outputs_and_gradients(model, x)
    for name, got, plain, want in zip(names, half, half_pytorch, reference, strict=False):
        kernel_error, pytorch_error = relative_error(got, want), relative_error(plain, want)
        factor = CANCELLING.get(name, BFLOAT16_FACTOR)
        assert kernel_error < factor * pytorch_error + 1e-3, (
            name,
            kernel_error,
            pytorch_error,
        )
