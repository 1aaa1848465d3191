"""The selection, compressed and rotary kernels past 2^31 elements (skipped without a GPU).

At 256k tokens, 64 query heads of 128, q holds 2^31 elements: an offset into q, out, dO
or dq computed in 32 bits wraps around late in the sequence, and the kernel reads or
writes the wrong rows there. Each test runs a kernel over the whole sequence with an
output gradient that is zero except on the last TAIL queries, and holds the output and
dq of those queries, and dk, dv (which then come from them alone), to the PyTorch path
computed for those queries only, in float32.
"""

import pytest
import torch
from kernel_checks import HALF_PRECISION_TOLERANCE, relative_error

from nsa_tutorial.compress import compressed_attention as compressed_reference
from nsa_tutorial.fine_attention import fine_attention_gathered

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
N, TAIL = 262_144, 128
HEADS, KV_HEADS, DIM = 64, 4, 128
STRIDE = 16  # the compressed keys' stride; one memory token
TOLERANCE = HALF_PRECISION_TOLERANCE[torch.bfloat16]


def long_inputs(seed: int, key_length: int) -> tuple[torch.Tensor, ...]:
    """q (1, HEADS, N, DIM), keys and values (1, KV_HEADS, key_length, DIM) in bfloat16,
    as leaves, and an output gradient that is zero before the last TAIL queries."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HEADS, N, DIM, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, key_length, DIM, device="cuda", generator=g).bfloat16()
            for _ in "kv")  # fmt: skip
    grad_out = torch.zeros_like(q)
    grad_out[:, :, -TAIL:] = torch.randn(1, HEADS, TAIL, DIM, device="cuda", generator=g)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad_out


def assert_tail_matches(out, leaves, grad_out, expected, wide_leaves):
    """out's and dq's last TAIL rows, and dk, dv, against the tail-only float32 path."""
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, wide_leaves, grad_out[:, :, -TAIL:].float())
    errors = {
        "out": relative_error(out[:, :, -TAIL:], expected),
        "dq": relative_error(grads[0][:, :, -TAIL:], expected_grads[0]),
        "dk": relative_error(grads[1], expected_grads[1]),
        "dv": relative_error(grads[2], expected_grads[2]),
    }
    assert max(errors.values()) < TOLERANCE, errors


def tail_leaves(q, k, v):
    """The last TAIL queries and all keys and values, float32 leaves of the reference."""
    return [t.detach().float().requires_grad_() for t in (q[:, :, -TAIL:], k, v)]


def test_selection_kernel_at_256k_tokens():
    from nsa_tutorial.kernels import patterns
    from nsa_tutorial.kernels.selection import selection_attention

    q, k, v, grad_out = long_inputs(0, N)
    g = torch.Generator(device="cuda").manual_seed(1)
    indices, selected = patterns.uniform_random(1, KV_HEADS, N, block_size=64, num_selected=16,
                                                generator=g, device="cuda")  # fmt: skip
    out = selection_attention(q, k, v, indices, selected, block_size=64)
    wide = tail_leaves(q, k, v)
    expected = fine_attention_gathered(
        *wide, indices[:, :, -TAIL:], selected[:, :, -TAIL:], block_size=64, causal=True,
        first_query=N - TAIL,
    )  # fmt: skip
    assert_tail_matches(out, (q, k, v), grad_out, expected, wide)


def test_compressed_kernel_at_256k_tokens():
    from nsa_tutorial.kernels.compressed import compressed_attention

    q, ck, cv, grad_out = long_inputs(2, 1 + N // STRIDE)
    out = compressed_attention(q, ck, cv, num_memory=1, stride=STRIDE, causal=True)
    wide = tail_leaves(q, ck, cv)
    expected, _ = compressed_reference(*wide, 1, STRIDE, True, first_query=N - TAIL)
    assert_tail_matches(out, (q, ck, cv), grad_out, expected, wide)


def test_rotary_kernel_at_256k_tokens():
    """q as the layer makes it, the heads of the qkv projection (token stride 64 * 128 +
    2 * 4 * 128): its last tokens sit past 2^31 elements."""
    from einops import rearrange

    from nsa_tutorial.kernels.glue import rotary_triton
    from nsa_tutorial.rotary import apply_rotary, rotary_frequencies

    width = (HEADS + 2 * KV_HEADS) * DIM
    g = torch.Generator(device="cuda").manual_seed(3)
    projection = torch.randn(1, N, width, device="cuda", generator=g).bfloat16()
    q = rearrange(projection[..., : HEADS * DIM], "b n (h d) -> b h n d", d=DIM)
    freqs = rotary_frequencies(DIM).cuda()
    rotated = rotary_triton(q, freqs)[:, :, -TAIL:]
    expected = apply_rotary(q[:, :, -TAIL:].float(), freqs, N - TAIL)
    assert relative_error(rotated, expected) < TOLERANCE
