"""The three NSA branches with their gates (no projections, no rotary) as each provider
computes them, on the same q, k, v and gates, for `layer_gpu.py`'s comparison (b).

- ours: the compression MLP, the compressed-attention kernel with the one-pass top-n,
  the selection kernel, the window kernel, the gated-sum kernel;
- fla-core 0.6.0: `parallel_nsa` with g_cmp and g_slc (its compression is a mean over
  non-overlapping blocks of 64 and its top-n is its own), plus our window;
- XunhaoLai's native-sparse-attention-triton: `linear_compress` of k and v (blocks of 32,
  stride 16), `compressed_attention` with top-n (1 initial and 2 local blocks forced),
  `topk_sparse_attention`, plus our window.

Every stack gets the same window, the layer's (`nsa_tutorial.kernels.window`), so the
stacks differ only in compression and selection; neither peer ships a window of its own
in these calls. (Issue 12 named flex attention for it, the layer's window when the issue
was written; the kernel is faster, so flex would have slowed only the peers.)

The peers are imported only if present (carried to the GPU machine, never committed);
each stack takes its inputs in its own layout, converted before timing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from nsa_tutorial import SparseAttention
from nsa_tutorial.kernels.glue import gated_sum_triton

Stack = Callable[[], Tensor]


def ours(model: SparseAttention, q: Tensor, k: Tensor, v: Tensor, gates: Tensor) -> Tensor:
    """q (b, h, n, d), k, v (b, hk, n, d), gates (b, h, n, 3) -> (b, n, h * d)."""
    ck, cv = model.compressed_tokens(k, v)
    compressed, top = model.compressed_branch(q, ck, cv, use_kernels=True)
    selected = model.selected_branch(q, k, v, top, use_triton=True)
    sliding = model.sliding_branch(q, k, v, use_kernels=True)
    return gated_sum_triton(gates, compressed, selected, sliding)


def window(model: SparseAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The layer's window for every stack, (b, h, n, d) -> (b, n, h, d) view."""
    return rearrange(model.sliding_branch(q, k, v, use_kernels=True), "b h n d -> b n h d")


def fla_stack(
    model: SparseAttention, q: Tensor, k: Tensor, v: Tensor, gates: Tensor
) -> tuple[Stack, tuple[Tensor, ...]]:
    """fla-core's parallel_nsa (compression + selection) + the window -> (b, n, h, d), and
    the inputs in its layout (leaves that take gradients)."""
    from fla.ops.nsa import parallel_nsa

    q_t, k_t, v_t = (_leaf(rearrange(t, "b h n d -> b n h d")) for t in (q, k, v))
    g_cmp, g_slc, g_swa = (_leaf(rearrange(g, "b h n -> b n h")) for g in gates.unbind(-1))

    def run() -> Tensor:
        out = parallel_nsa(
            q_t, k_t, v_t, g_cmp=g_cmp, g_slc=g_slc, block_counts=model.num_selected_blocks,
            block_size=model.selection_block_size, scale=model.scale,
        )  # fmt: skip
        return out + g_swa[..., None] * window(model, q, k, v)

    return run, (q_t, k_t, v_t, g_cmp, g_slc, g_swa)


def xunhao_stack(
    model: SparseAttention, q: Tensor, k: Tensor, v: Tensor, gates: Tensor
) -> tuple[Stack, tuple[Tensor, ...]]:
    """XunhaoLai's compression + compressed attention + top-k attention + the window ->
    (n, h, d) (batch 1), and the inputs in its layout, weights included."""
    from native_sparse_attention.ops import (
        compressed_attention,
        linear_compress,
        topk_sparse_attention,
    )

    n, d = q.shape[-2:]
    hk, block, stride = k.shape[1], model.compress_block_size, model.compress_block_sliding_stride
    q_n, k_n, v_n = (_leaf(rearrange(t, "1 h n d -> n h d")) for t in (q, k, v))
    g_n = _leaf(rearrange(gates, "1 h n branch -> n h branch"))
    cu = torch.tensor([0, n], device=q.device, dtype=torch.int32)
    wk, wv = (_leaf(torch.randn(hk, block * d, d, device=q.device, dtype=q.dtype)
                    * (block * d) ** -0.5) for _ in range(2))  # fmt: skip
    pe = _leaf(torch.zeros(hk, block, d, device=q.device, dtype=q.dtype))

    def run() -> Tensor:
        ck, cu_c = linear_compress(k_n, wk, cu, block, stride, pe)
        cv, _ = linear_compress(v_n, wv, cu, block, stride, None)
        compressed, top = compressed_attention(
            q_n, ck, cv, block, stride, model.selection_block_size, model.num_selected_blocks,
            cu, cu_c, sm_scale=model.scale, init_blocks=1, local_blocks=2,
        )  # fmt: skip
        selected = topk_sparse_attention(
            q_n, k_n, v_n, top, model.selection_block_size, cu, model.scale
        )
        sliding = window(model, q, k, v)[0]
        out = g_n[..., 0:1] * compressed + g_n[..., 1:2] * selected
        return out + g_n[..., 2:3] * sliding

    return run, (q_n, k_n, v_n, g_n, wk, wv, pe)


def _leaf(t: Tensor) -> Tensor:
    """A contiguous copy of t that takes gradients of its own (conversion is not timed)."""
    return t.detach().contiguous().requires_grad_()


def peer_available(name: str) -> bool:
    """Whether the peer package `name` imports here."""
    try:
        __import__(name)
    except ImportError:
        return False
    return True
