"""Stage 10: importance and top-n blocks in one Triton pass.

`nsa_tutorial.kernels.importance.top_blocks_from_keys` scores every selection block in
PyTorch, a chunk of queries at a time: a (chunk, w') float32 product, a mask, a
log-sum-exp and a top-n, each a pass over memory. Here one program takes a tile of
queries of one head and walks the block keys a tile at a time, keeping in registers:

- the running max and sum of exp over the visible blocks (an online log-sum-exp, as in
  flash attention), so that the top-n values come out as probabilities with the sink;
- the best n blocks seen so far, as 64-bit ranks (score bits high, block low, so that
  every rank is distinct and ties go to the lower block). A new tile's ranks replace
  the worst kept one, largest first, only while they beat it: after the first tiles
  few do, so the merge costs a few steps, not a sort.

The numbers are `top_blocks_from_keys`'s: the same block keys and group means (made by
PyTorch, small), float32 scores (see `_precision`), hidden blocks at float32's lowest
value, ties to the lower block (torch.topk promises no order; ties happen among hidden
blocks, whose probability is 0). No gradient: the layer calls it unless diff-topk needs
the values' gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from einops import einsum, rearrange
from torch import Tensor

from nsa_tutorial.importance import SINK_LOGIT
from nsa_tutorial.kernels import (
    require_kernel_device,
    require_kernel_dtype,
    require_runnable_kernels,
)
from nsa_tutorial.kernels.importance import _block_map
from nsa_tutorial.validation import require_bool, require_number, require_positive_int

# Chosen on an H200 at 64k tokens (issue 12's shape) from queries 16-64, blocks 32-64, 4 or
# 8 warps, both precisions (benchmarks/top_blocks_tuning_gpu.py and its JSON); in
# benchmarks/top_blocks_gpu.json, bfloat16: 3.88 ms against the PyTorch chunks' 14.61.
BLOCK_M = 64  # queries per program
BLOCK_N = 32  # selection blocks per step
NUM_WARPS = 4
MAX_SELECTED = 64  # blocks kept per query in registers; more: `top_blocks_from_keys`
# torch.finfo(torch.float32).min, a hidden block's score
FLOAT32_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)
NO_RANK: tl.constexpr = tl.constexpr(-(2139095041 << 32) - 1)  # below any score's rank, even -inf's
UNUSED: tl.constexpr = tl.constexpr(2**63 - 1)  # kept places past K: above every rank


@triton.jit
def _ranks(scores, blocks):
    """int64 keys that order as the float32 scores (R, C) do, ties to the lower of the
    blocks (C,): the order-preserving integer of the score's bits, then the block."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negatives count down
    return (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - blocks.to(tl.int64))[None, :]


@triton.jit
def _unrank(ranks):
    """The scores (float32) and blocks (int64) that `_ranks` packed."""
    high = ranks >> 32
    ordered = high.to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (ranks - (high << 32))


@triton.jit
def _keep_best(best, ranks):
    """Merge a tile's ranks (R, C; NO_RANK where no block) into the best K of each row
    (R, K_PAD; places past K at UNUSED): while some rank beats a row's worst kept one, the
    row's largest such rank takes that place. Kept ranks are distinct, so one place
    changes per row and step; the steps stop when no row has a rank above its worst."""
    worst = tl.min(best, 1)
    candidates = tl.where(ranks > worst[:, None], ranks, NO_RANK)
    while tl.max(tl.max(candidates, 1), 0) > NO_RANK:
        pick = tl.max(candidates, 1)  # (R,)
        improves = pick > NO_RANK  # a candidate is above its row's worst, or NO_RANK
        best = tl.where((best == worst[:, None]) & improves[:, None], pick[:, None], best)
        worst = tl.min(best, 1)
        candidates = tl.where((candidates != pick[:, None]) & (candidates > worst[:, None]),
                              candidates, NO_RANK)
    return best


@triton.jit
def _top_blocks_kernel(
    Q, BLOCK_KEYS, FIRST, VALUES, INDICES, n, num_selection, heads, heads_per_key,
    selection_block, sink, stride_qb, stride_qh, stride_qn,
    K: tl.constexpr, K_PAD: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HIDE_OWN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (query tile, batch * head): the top K selection blocks of BLOCK_M queries
    and their probabilities exp(score - log-sum-exp with the sink), in descending order."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads, bh % heads
    queries = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_rows = b * stride_qb + h * stride_qh + queries.to(tl.int64)[:, None] * stride_qn
    q_ptrs = Q + q_rows + dims[None, :]
    q = tl.load(q_ptrs, mask=(queries < n)[:, None] & (dims < D)[None, :], other=0.0)
    q = q.to(tl.float32)  # (BLOCK_M, BLOCK_D)
    keys_head = BLOCK_KEYS + (b * (heads // heads_per_key) + h // heads_per_key) * num_selection * D

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # max over visible blocks so far
    total = tl.zeros([BLOCK_M], tl.float32)  # sum of exp(score - m) over them
    places = tl.arange(0, K_PAD)
    kept = tl.where(places < K, NO_RANK - 1 - places.to(tl.int64),  # distinct, below all
                    tl.full([K_PAD], UNUSED, tl.int64))
    best = tl.broadcast_to(kept[None, :], [BLOCK_M, K_PAD])
    for start in range(0, num_selection, BLOCK_N):
        blocks = start + tl.arange(0, BLOCK_N)
        exists = blocks < num_selection
        block_keys = tl.load(keys_head + blocks[:, None] * D + dims[None, :],
                             mask=exists[:, None] & (dims < D)[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(block_keys), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        first = tl.load(FIRST + blocks, mask=exists, other=0)
        hidden = queries[:, None] < first[None, :]  # a compressed block not complete yet
        if HIDE_OWN:  # remapped blocks: the query's own block is fine attention's
            hidden = hidden | ((queries // selection_block)[:, None] == blocks[None, :])
        visible = exists[None, :] & ~hidden

        m_new = tl.maximum(m, tl.max(tl.where(visible, scores, float("-inf")), 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible block yet
        p = tl.where(visible, tl.exp(scores - shift[:, None]), 0.0)
        total = total * tl.exp(m - shift) + tl.sum(p, 1)
        m = m_new

        ranks = _ranks(tl.where(hidden, FLOAT32_LOWEST, scores), blocks)
        best = _keep_best(best, tl.where(exists[None, :], ranks, NO_RANK))

    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    top = tl.maximum(lse, sink)
    lse = top + tl.log(tl.exp(lse - top) + tl.exp(sink - top))  # log(exp(lse) + exp(sink))
    rows = (bh * n + queries) * K
    for place in tl.static_range(K):  # the kept ranks, largest first
        rank = tl.max(tl.where(places[None, :] < K, best, NO_RANK), 1)
        best = tl.where(best == rank[:, None], NO_RANK, best)
        score, block = _unrank(rank)
        tl.store(VALUES + rows + place, tl.exp(score - lse), mask=queries < n)
        tl.store(INDICES + rows + place, block, mask=queries < n)


def top_blocks_kernel(
    q: Tensor, ck: Tensor, *, num_selected: int, stride: int, selection_block: int,
    group_size: int | None, interpolate: bool, causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`top_blocks_from_keys` in one Triton pass, without gradients: q (b, hq, n, d) and the
    compressed keys ck (b, hk, w, d) -> (values float32, indices int64) (b, h, n, s).

    h is hk when group_size shares one selection per GQA group, hq when it is None;
    s = min(num_selected, w'), values in descending order.
    """
    _check_inputs(q, ck, num_selected, stride, selection_block, group_size, causal, scale)
    require_runnable_kernels()
    weights, first_query = _block_map(
        ck.shape[-2], stride, selection_block, interpolate, causal, q.device
    )
    block_keys = einsum(weights, ck.float(), "c w, b h c d -> b h w d") * scale  # (b, hk, w', d)
    dtype = q.dtype
    if group_size is not None:  # the group mean in float32, as top_blocks_from_keys takes it
        q = rearrange(q, "b (h g) n d -> b h g n d", g=group_size).mean(dim=2, dtype=torch.float32)
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, heads, n, d = q.shape
    num_selection = block_keys.shape[-2]
    k = min(num_selected, num_selection)
    values = torch.empty(b, heads, n, k, dtype=torch.float32, device=q.device)
    indices = torch.empty(b, heads, n, k, dtype=torch.long, device=q.device)
    if k == 0:
        return values, indices
    _top_blocks_kernel[(triton.cdiv(n, BLOCK_M), b * heads)](
        q, block_keys.contiguous(), first_query, values, indices, n, num_selection, heads,
        heads // ck.shape[1], selection_block, SINK_LOGIT, q.stride(0), q.stride(1),
        q.stride(2), K=k, K_PAD=triton.next_power_of_2(k), D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(d)), HIDE_OWN=stride != selection_block,
        PRECISION=_precision(dtype), num_warps=NUM_WARPS,
    )  # fmt: skip
    return values, indices


def _precision(dtype: torch.dtype) -> str:
    """How the kernel multiplies the float32 scores: float32 models in full precision
    (`ieee`), the PyTorch path's products up to the order of the sums; half-precision
    models with three tf32 products (`tf32x3`), near float32 and 3.0x faster (64k on an
    H200: 3.89 against 11.58 ms, top_blocks_tuning_gpu.json). On random bfloat16 data at
    64k, ieee picked the PyTorch path's blocks in all 262,144 (kv head, query) rows of the
    tuning run; tf32x3 differed in 1 there and in 4 in top_blocks_gpu.json (near ties),
    far fewer than the model's own rounding moves."""
    return "ieee" if dtype == torch.float32 else "tf32x3"


def _check_inputs(
    q: Tensor, ck: Tensor, num_selected: int, stride: int, selection_block: int,
    group_size: int | None, causal: bool, scale: float,
) -> None:  # fmt: skip
    """Clear errors for what the kernel relies on, before anything launches."""
    for name, t in (("q", q), ("ck", ck)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (b, h, n, d), got shape {tuple(t.shape)}")
        require_kernel_dtype(name, t)
    require_kernel_device(q=q, ck=ck)
    if (
        (q.shape[0], q.shape[-1]) != (ck.shape[0], ck.shape[-1])
        or ck.shape[1] == 0
        or q.shape[1] % ck.shape[1]
    ):
        raise ValueError(
            f"ck must be (b, hk, w, d) with q's b and d and hk >= 1 dividing q's heads, got "
            f"q {tuple(q.shape)} and ck {tuple(ck.shape)}"
        )
    if q.shape[-1] > 256:
        raise ValueError(f"the head dimension must be at most 256, got d={q.shape[-1]}")
    if isinstance(num_selected, bool) or not isinstance(num_selected, int):
        raise TypeError(f"num_selected must be an int, got num_selected={num_selected!r}")
    if num_selected < 0:
        raise ValueError(f"num_selected must be >= 0, got num_selected={num_selected}")
    if num_selected > MAX_SELECTED:
        raise ValueError(
            f"num_selected must be at most {MAX_SELECTED} for the one-pass kernel (it keeps "
            f"each query's best blocks in registers; top_blocks_from_keys has no limit), got "
            f"num_selected={num_selected}"
        )
    if group_size is not None and group_size != q.shape[1] // ck.shape[1]:
        raise ValueError(
            f"group_size must be None or the query heads per kv head "
            f"({q.shape[1]} // {ck.shape[1]} = {q.shape[1] // ck.shape[1]}), got "
            f"group_size={group_size}"
        )
    require_positive_int("stride", stride)
    require_positive_int("selection_block", selection_block)
    require_bool("causal", causal)
    require_number("scale", scale)
