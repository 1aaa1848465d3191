"""Stages 08-09: the selection branch as Triton kernels (paper §3.4, Kernel Design, Fig. 3).

Forward, two kernels that split the work by query tile (TOKENS consecutive tokens of one
kv head; notebook 09):
- shared tiles: where the tile's tokens pick mostly the same blocks, one program holds
  the tile's rows (token, head) and loads each distinct block once for all of them; a
  row is masked out of a block its token did not pick, so the result is exact (with
  SPLIT_PRIVATE, a block only one token picked runs on that token's rows alone);
- other tiles: one program per (token, kv head) holds the G query heads of that GQA
  group and walks the token's own blocks (the paper's group-centric layout).
Both keep an online softmax over the blocks. `plan_tiles` decides, per tile, which
kernel is cheaper from how many distinct blocks the tile reads.

Backward, three steps:
- dq (and the gradient of the diff-topk gates): the same two kernels' walks;
- an inverted index: for each key block, the (token, slot) pairs that selected it;
- dk, dv: each key block's readers, cut into chunks of at most `chunk` entries, one
  program per chunk; a block read in several chunks (block 0, read by every token, say)
  sums its chunks' partial dk, dv in a fixed order afterwards, so the result is
  deterministic and no program carries a whole hot block alone.

Every kernel loads its key/value blocks through `_key_block` and takes its softmax
steps through `_softmax_step` or `_gradient_step`, the way Triton's fused-attention
tutorial shares one inner helper between its stages.

The semantics are `fine_attention_gathered` of `nsa_tutorial.fine_attention`, except
that a query that sees no key at all (possible only without the block-causal diagonal)
gets zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from einops import rearrange, repeat
from torch import Tensor

from nsa_tutorial.kernels import (
    check_attention_tensors,
    require_kernel_device,
    require_runnable_kernels,
    triton_mode,
)

LOG2_E = math.log2(math.e)  # the kernels use exp2: logits are scaled by scale * LOG2_E
NO_BLOCK = -1  # a slot of `blocks` (and of `codes`) that attends nothing
Kernel = Literal["forward", "dq", "tile_forward", "tile_dq", "dkv"]


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: warps per program and software-pipelining depth
    (num_stages=2: the next key block loads while this one is computed)."""

    num_warps: int
    num_stages: int
    rows: int = 0  # tile kernels: rows (token, head) per tile; dk, dv: rows per step
    chunk: int = 0  # dk, dv kernel only: most (token, slot) readers per program


# Chosen on an H200: the walk's and dk, dv's warps, stages and rows by
# benchmarks/selection_kernel_gpu.py --sweep (notebook 09 plots it); the tiles' rows,
# warps and stages, the chunk and TILE_COST_LIMIT by benchmarks/selection_tuning_gpu.py.
# tile_dq takes the forward's tiles (the plan is made once, with tile_forward's rows).
LAUNCH: dict[Kernel, Launch] = {
    "forward": Launch(num_warps=2, num_stages=2),
    "dq": Launch(num_warps=2, num_stages=2),
    "tile_forward": Launch(num_warps=4, num_stages=2, rows=64),
    "tile_dq": Launch(num_warps=4, num_stages=2),
    "dkv": Launch(num_warps=4, num_stages=2, rows=64, chunk=2048),
}
# Heads over 128 wide (192, 256): one stage, so that their blocks fit in shared memory,
# and more warps where benchmarks/selection_tuning_gpu.py --round 3 found them faster, each
# change timed alone from the earlier settings (walk 2 warps, dk, dv 4: the JSON's
# "launch"; H200, 32k, pattern c): dk, dv at 8 warps took fwd+bwd from 86.6 to 72.9 ms at
# d = 192 and from 89.0 to 73.9 at 256; the walk at 4 warps, every tile walked, took the
# forward from 26.8 to 24.8 ms at 192. The two together are not timed yet.
WIDE_LAUNCH: dict[Kernel, Launch] = {
    "forward": Launch(num_warps=4, num_stages=1),
    "dq": Launch(num_warps=4, num_stages=1),
    "tile_forward": Launch(num_warps=4, num_stages=1, rows=64),
    "tile_dq": Launch(num_warps=4, num_stages=1),
    "dkv": Launch(num_warps=8, num_stages=1, rows=64, chunk=2048),
}
# A tile takes the shared-tile kernels when their work (distinct blocks x the tile's rows)
# is at most TILE_COST_LIMIT times the per-token walk's (read blocks x BLOCK_G rows each).
TILE_COST_LIMIT = 2.5
# With SPLIT_PRIVATE, a shared tile of several tokens, each with at least 16 rows (G > 8),
# runs the blocks only one of its tokens reads on that token's rows alone (the private
# pass, see `plan_tiles`). Off until timed on a GPU (selection_tuning_gpu.py --round 4):
# compiled for sm_90, the tile kernels spill more with it (tests/compiled_kernels.py).
SPLIT_PRIVATE = False


def launch_settings(kernel: Kernel, dim: int) -> Launch:
    """`kernel`'s settings for heads `dim` wide: from WIDE_LAUNCH over 128, else LAUNCH."""
    return (WIDE_LAUNCH if dim > 128 else LAUNCH)[kernel]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation; "upcast" multiplies in float32 instead (Triton
    3.7's interpreter gets bfloat16 dots wrong; bfloat16 -> float32 is exact)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_block(K_HEAD, V_HEAD, stride_kn, block, end, block_size, D: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Keys and values of block `block` at positions before `end`: k, v (BLOCK_K, BLOCK_D)
    and key_ok (BLOCK_K,). A selected block ends at n (the last one may be partial); the
    block-causal diagonal, the token's own block, ends at the token: end = t + 1."""
    in_block = tl.arange(0, BLOCK_K)
    keys = block * block_size + in_block
    key_ok = (in_block < block_size) & (keys < end)
    dims = tl.arange(0, BLOCK_D)
    offsets = keys[:, None].to(tl.int64) * stride_kn + dims[None, :]
    ok = key_ok[:, None] & (dims < D)[None, :]
    k = tl.load(K_HEAD + offsets, mask=ok, other=0.0)
    v = tl.load(V_HEAD + offsets, mask=ok, other=0.0)
    return k, v, key_ok


@triton.jit
def _softmax_step(q, k, v, visible, log2_scale, m, total, acc, PRECISION: tl.constexpr):
    """One key block of an online softmax: rows q (R, D) against k, v (BLOCK_K, D).

    `visible` (R or 1, BLOCK_K) says which keys each row sees. Logits are in log2 units
    (log2_scale = scale * log2 e, times the gate; a scalar or (R, 1)); m is the running
    max, total the running sum and acc the running numerator; rows that saw nothing keep
    m = -inf.
    """
    s = _dot(q, tl.trans(k), PRECISION) * log2_scale  # (R, BLOCK_K)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, total, acc


@triton.jit
def _gradient_step(q, do, lse, delta, k, v, visible, log2_scale, PRECISION: tl.constexpr):
    """Rows (R, D) against one key block: dL/dlogit ds (R, BLOCK_K) and the raw dot
    products qk (the gates' gradient needs them); `visible` and `log2_scale` as in
    `_softmax_step`."""
    qk = _dot(q, tl.trans(k), PRECISION)
    p = tl.exp2(qk * log2_scale - lse[:, None])
    p = tl.where(visible, p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return ds, qk


@triton.jit
def _finish_softmax(m, total, acc):
    """The rows' output acc / total and log2-sum-exp; a row that saw nothing gets zeros
    and lse = +inf (so its backward probabilities are 0)."""
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("inf"))
    return out, lse


# ---- the per-token walk: one program per (token, kv head) ------------------------------


@triton.jit
def _group_program(
    K, V, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
    num_tiles, G: tl.constexpr, D: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Where program (token t, batch b * kv head h) of the walk kernels works: the G query
    heads h*G .. h*G+G-1 of the group as the rows of one tile (Fig. 3).

    Returns whether the token's tile goes to the shared-tile kernels instead (then this
    program has nothing to do); t and bh; the tile's offsets (BLOCK_G, BLOCK_D) in a
    (b, hq, n, d) tensor (q, out, dO, dq) and which of them are real; each row's offset
    (BLOCK_G,) in a (b, hq, n) tensor (lse, delta) and which rows are heads; the group's
    key and value head.
    """
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    elsewhere = tl.load(SHARED + bh * num_tiles + t // TOKENS) != 0
    b, h = bh // num_kv_heads, bh % num_kv_heads
    tile, tile_ok, rows, head_ok = _token_rows(b, h, t, n, num_kv_heads, stride_qb, stride_qh,
                                               stride_qn, G, D, BLOCK_G, BLOCK_D)
    kv_head = b * stride_kb + h * stride_kh
    return elsewhere, t, bh, tile, tile_ok, rows, head_ok, K + kv_head, V + kv_head


@triton.jit
def _token_rows(b, h, t, n, num_kv_heads, stride_qb, stride_qh, stride_qn, G: tl.constexpr,
                D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t's G query heads h*G .. h*G+G-1 as ROWS rows (those past G, or past n, are
    not real): their offsets (ROWS, BLOCK_D) in a (b, hq, n, d) tensor and which are real,
    each row's offset (ROWS,) in a (b, hq, n) tensor and which rows are real."""
    heads = h * G + tl.arange(0, ROWS)
    head_ok = (tl.arange(0, ROWS) < G) & (t < n)
    dims = tl.arange(0, BLOCK_D)
    tile = b * stride_qb + heads[:, None] * stride_qh + t * stride_qn + dims[None, :]
    tile_ok = head_ok[:, None] & (dims < D)[None, :]
    rows = (b * num_kv_heads * G + heads) * n + t
    return tile, tile_ok, rows, head_ok


@triton.jit
def _read_slots(CODES, PRIVATE, bh, t, n, num_slots, S_PAD: tl.constexpr,
                ONLY_PRIVATE: tl.constexpr):
    """Token t's slots: the offset `first` of the first in CODES (and the gates), then as
    vectors (S_PAD,): slot, code, whether it is read (ONLY_PRIVATE: and private, see
    `plan_tiles`), and its rank among the read ones. The loop then visits only read
    slots, with no branch that would stop Triton from loading the next block while it
    works on this one."""
    first = (bh * n + t) * num_slots
    slot = tl.arange(0, S_PAD)
    ok = (slot < num_slots) & (t < n)
    codes = tl.load(CODES + first + slot, mask=ok, other=-1)
    read = codes >= 0
    if ONLY_PRIVATE:
        read = read & (tl.load(PRIVATE + first + slot, mask=ok, other=0) != 0)
    rank = tl.cumsum(read.to(tl.int32), 0) - 1
    return first, slot, codes, read, rank


@triton.jit
def _pick_slot(slot_ids, slot_codes, read, rank, i):
    """The i-th read slot of `_read_slots`' vectors: (code, slot)."""
    picked = read & (rank == i)
    return tl.sum(tl.where(picked, slot_codes, 0), 0), tl.sum(tl.where(picked, slot_ids, 0), 0)


@triton.jit
def _walk_softmax(
    q, K_HEAD, V_HEAD, GATES, first, slot_ids, slot_codes, read, rank, stride_kn, n,
    num_blocks, block_size, log2_scale, D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_GATES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The online softmax (m, total, acc) of one token's rows q (R, BLOCK_D) over its
    read slots' blocks, one block at a time."""
    R: tl.constexpr = q.shape[0]
    m = tl.full([R], float("-inf"), tl.float32)
    total = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], tl.float32)
    for i in range(tl.sum(read.to(tl.int32), 0)):
        code, slot = _pick_slot(slot_ids, slot_codes, read, rank, i)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, code % num_blocks, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        scale = log2_scale
        if HAS_GATES:
            scale = log2_scale * tl.load(GATES + first + slot).to(tl.float32)
        m, total, acc = _softmax_step(q, k, v, key_ok[None, :], scale, m, total, acc, PRECISION)
    return m, total, acc


@triton.jit
def _walk_dq(
    q, do, lse, delta, K_HEAD, V_HEAD, GATES, DGATES, first, slot_ids, slot_codes, read, rank,
    stride_kn, n, num_blocks, block_size, sm_scale, log2_scale, D: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_GATES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dq (without the softmax scale) of one token's rows q (R, BLOCK_D) over its read
    slots' blocks; with gates, stores d gate of each of those slots (summed over rows)."""
    dq = tl.zeros([q.shape[0], BLOCK_D], tl.float32)
    for i in range(tl.sum(read.to(tl.int32), 0)):  # a slot not read keeps gate gradient 0
        code, slot = _pick_slot(slot_ids, slot_codes, read, rank, i)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, code % num_blocks, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        gate = 1.0
        if HAS_GATES:
            gate = tl.load(GATES + first + slot).to(tl.float32)
        ds, qk = _gradient_step(q, do, lse, delta, k, v, key_ok[None, :], log2_scale * gate,
                                PRECISION)
        dq += _dot((ds * gate).to(k.dtype), k, PRECISION)
        if HAS_GATES:
            tl.store(DGATES + first + slot, tl.sum(tl.sum(ds * qk, 1), 0) * sm_scale)
    return dq


@triton.jit
def _forward_kernel(
    Q, K, V, CODES, GATES, SHARED, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): out and log2-sum-exp of heads h*G .. h*G+G-1."""
    elsewhere, t, bh, tile, tile_ok, rows, head_ok, K_HEAD, V_HEAD = _group_program(
        K, V, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
        num_tiles, G, D, TOKENS, BLOCK_G, BLOCK_D,
    )
    if elsewhere:
        return
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)  # (G, D)
    first, slot_ids, slot_codes, read, rank = _read_slots(CODES, CODES, bh, t, n, num_slots,
                                                          S_PAD, False)  # every read slot
    m, total, acc = _walk_softmax(
        q, K_HEAD, V_HEAD, GATES, first, slot_ids, slot_codes, read, rank, stride_kn, n,
        num_blocks, block_size, log2_scale, D, BLOCK_K, BLOCK_D, HAS_GATES, PRECISION,
    )  # fmt: skip
    if CAUSAL:  # the block-causal diagonal: the own block up to the token itself
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, t // block_size, t + 1, block_size,
                                  D, BLOCK_K, BLOCK_D)
        m, total, acc = _softmax_step(q, k, v, key_ok[None, :], log2_scale, m, total, acc,
                                      PRECISION)
    out, lse = _finish_softmax(m, total, acc)
    tl.store(OUT + tile, out.to(OUT.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + rows, lse, mask=head_ok)


@triton.jit
def _backward_dq_kernel(
    Q, K, V, OUT, DO, LSE, CODES, GATES, SHARED, DQ, DGATES, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): dq of the group's heads and, with gates,
    d gate for each of the token's slots (summed over the group's heads); also stores
    delta = rowsum(dO * O) for the dk, dv kernel."""
    elsewhere, t, bh, tile, tile_ok, rows, head_ok, K_HEAD, V_HEAD = _group_program(
        K, V, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
        num_tiles, G, D, TOKENS, BLOCK_G, BLOCK_D,
    )
    if elsewhere:
        return
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)
    do = tl.load(DO + tile, mask=tile_ok, other=0.0)
    out = tl.load(OUT + tile, mask=tile_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)  # softmax backward's rowsum(dO * O)
    tl.store(DELTA + rows, delta, mask=head_ok)  # for the dk, dv kernel
    lse = tl.load(LSE + rows, mask=head_ok, other=float("inf"))
    first, slot_ids, slot_codes, read, rank = _read_slots(CODES, CODES, bh, t, n, num_slots,
                                                          S_PAD, False)  # every read slot
    dq = _walk_dq(
        q, do, lse, delta, K_HEAD, V_HEAD, GATES, DGATES, first, slot_ids, slot_codes, read,
        rank, stride_kn, n, num_blocks, block_size, sm_scale, log2_scale, D, BLOCK_K, BLOCK_D,
        HAS_GATES, PRECISION,
    )  # fmt: skip
    if CAUSAL:  # the block-causal diagonal: the own block up to the token itself
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, t // block_size, t + 1, block_size,
                                  D, BLOCK_K, BLOCK_D)
        ds, _ = _gradient_step(q, do, lse, delta, k, v, key_ok[None, :], log2_scale, PRECISION)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + tile, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


# ---- shared tiles: one program per (query tile, kv head) ------------------------------


@triton.jit
def _tile_program(
    K, V, CODES, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n,
    num_kv_heads, num_slots, num_tiles, G: tl.constexpr, D: tl.constexpr,
    TOKENS: tl.constexpr, G_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Where program (query tile i, batch b * kv head h) of the shared-tile kernels works:
    rows r = (token i*TOKENS + r // G_PAD, head h*G + r % G_PAD), TOKENS * G_PAD of them.

    Returns whether the tile goes to the walk kernels instead; the tile's number in the
    (b * hk, tiles) plan; each row's token and whether it is real (rows past n or past
    the group's G heads are not); the rows' offsets (ROWS, BLOCK_D) in a (b, hq, n, d)
    tensor and which are real; each row's offset in a (b, hq, n) tensor; the rows' slot
    offsets (ROWS, S_PAD) in a (b, hk, n, s) tensor (codes, gates) and which are real;
    their codes; the group's key and value head.
    """
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    plan = bh * num_tiles + i
    elsewhere = tl.load(SHARED + plan) == 0
    b, h = bh // num_kv_heads, bh % num_kv_heads
    r = tl.arange(0, TOKENS * G_PAD)
    tokens = i * TOKENS + r // G_PAD
    group_head = r % G_PAD
    row_ok = (group_head < G) & (tokens < n)
    heads = h * G + group_head
    dims = tl.arange(0, BLOCK_D)
    tile = b * stride_qb + heads[:, None] * stride_qh + tokens[:, None] * stride_qn + dims[None, :]
    tile_ok = row_ok[:, None] & (dims < D)[None, :]
    rows = (b * num_kv_heads * G + heads) * n + tokens
    slots = tl.arange(0, S_PAD)
    slot_offsets = (bh * n + tokens)[:, None] * num_slots + slots[None, :]
    slot_ok = row_ok[:, None] & (slots < num_slots)[None, :]
    codes = tl.load(CODES + slot_offsets, mask=slot_ok, other=-1)
    kv_head = b * stride_kb + h * stride_kh
    return (elsewhere, plan, tokens, row_ok, tile, tile_ok, rows, slot_offsets, slot_ok, codes,
            K + kv_head, V + kv_head)


@triton.jit
def _tile_reads(GATES, UNION, plan, slot_offsets, slot_ok, TOKENS: tl.constexpr,
                S_PAD: tl.constexpr, HAS_GATES: tl.constexpr):
    """What both shared-tile kernels read once: the rows' gates (ROWS, S_PAD; 0.0 without
    gates), the tile's distinct codes (TOKENS * S_PAD,) and their places."""
    gates = 0.0
    if HAS_GATES:
        gates = tl.load(GATES + slot_offsets, mask=slot_ok, other=0.0).to(tl.float32)
    places = tl.arange(0, TOKENS * S_PAD)
    return gates, tl.load(UNION + plan * TOKENS * S_PAD + places), places


@triton.jit
def _union_block(union, places, u, num_blocks, codes, gates, HAS_GATES: tl.constexpr):
    """The tile's u-th distinct block (of `union`, held in registers so that the loop has
    no load to wait for before it can fetch the block): its number, which rows' slots
    picked it (ROWS, S_PAD), which rows see it (ROWS, 1), and each row's gate on it
    (ROWS, 1; 1.0 without gates)."""
    code = tl.sum(tl.where(places == u, union, 0), 0)
    picked = codes == code
    sees = tl.max(picked.to(tl.int32), 1) > 0
    gate = 1.0
    if HAS_GATES:
        gate = tl.sum(tl.where(picked, gates, 0.0), 1)[:, None]
    return code % num_blocks, picked, sees[:, None], gate


@triton.jit
def _own_blocks(plan_tile, n, block_size, TOKENS: tl.constexpr):
    """The range of own blocks [first, last) of the tile's tokens: the causal diagonals."""
    start = plan_tile * TOKENS
    return start // block_size, (tl.minimum(start + TOKENS, n) - 1) // block_size + 1


@triton.jit
def _spread(x, TOKENS: tl.constexpr):
    """One token's rows x (R,) or (R, D) repeated for each of a tile's TOKENS tokens:
    (TOKENS * R,) or (TOKENS * R, D), in the tile's row order."""
    R: tl.constexpr = x.shape[0]
    if len(x.shape) == 1:
        spread = tl.reshape(tl.broadcast_to(x[None, :], (TOKENS, R)), (TOKENS * R,))
    else:
        W: tl.constexpr = x.shape[1]
        spread = tl.reshape(tl.broadcast_to(x[None, :, :], (TOKENS, R, W)), (TOKENS * R, W))
    return spread


@triton.jit
def _private_forward(
    Q, K_HEAD, V_HEAD, CODES, GATES, PRIVATE, stride_qb, stride_qh, stride_qn, stride_kn,
    plan, n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, TOKENS: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, PRECISION: tl.constexpr,
):
    """The online softmax (m, total, acc) of the tile's rows over each token's private
    blocks (those no other token of the tile reads): token by token, its G_PAD rows walk
    its private slots as the per-token walk does, where the shared list would have run
    all the tile's rows on each of them."""
    bh = plan // num_tiles
    b, h = bh // num_kv_heads, bh % num_kv_heads
    row_token = tl.arange(0, TOKENS * G_PAD) // G_PAD
    m = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([TOKENS * G_PAD], tl.float32)
    acc = tl.zeros([TOKENS * G_PAD, BLOCK_D], tl.float32)
    for j in tl.static_range(TOKENS):
        t = (plan % num_tiles) * TOKENS + j
        tile, tile_ok, _, _ = _token_rows(b, h, t, n, num_kv_heads, stride_qb, stride_qh,
                                          stride_qn, G, D, G_PAD, BLOCK_D)
        q = tl.load(Q + tile, mask=tile_ok, other=0.0)  # (G_PAD, BLOCK_D)
        first, slot_ids, slot_codes, read, rank = _read_slots(CODES, PRIVATE, bh, t, n,
                                                              num_slots, S_PAD, True)
        m_t, total_t, acc_t = _walk_softmax(
            q, K_HEAD, V_HEAD, GATES, first, slot_ids, slot_codes, read, rank, stride_kn, n,
            num_blocks, block_size, log2_scale, D, BLOCK_K, BLOCK_D, HAS_GATES, PRECISION,
        )  # fmt: skip
        mine = row_token == j
        m = tl.where(mine, _spread(m_t, TOKENS), m)
        total = tl.where(mine, _spread(total_t, TOKENS), total)
        acc = tl.where(mine[:, None], _spread(acc_t, TOKENS), acc)
    return m, total, acc


@triton.jit
def _private_dq(
    Q, K_HEAD, V_HEAD, OUT, DO, LSE, CODES, GATES, PRIVATE, DGATES, stride_qb, stride_qh,
    stride_qn, stride_kn, plan, n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size,
    sm_scale, log2_scale, G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
    TOKENS: tl.constexpr, G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq (without the softmax scale) of the tile's rows from each token's private blocks,
    token by token as in `_private_forward`; with gates, stores d gate of those slots."""
    bh = plan // num_tiles
    b, h = bh // num_kv_heads, bh % num_kv_heads
    row_token = tl.arange(0, TOKENS * G_PAD) // G_PAD
    dq = tl.zeros([TOKENS * G_PAD, BLOCK_D], tl.float32)
    for j in tl.static_range(TOKENS):
        t = (plan % num_tiles) * TOKENS + j
        tile, tile_ok, rows, head_ok = _token_rows(b, h, t, n, num_kv_heads, stride_qb,
                                                   stride_qh, stride_qn, G, D, G_PAD, BLOCK_D)
        q = tl.load(Q + tile, mask=tile_ok, other=0.0)
        do = tl.load(DO + tile, mask=tile_ok, other=0.0)
        out = tl.load(OUT + tile, mask=tile_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
        lse = tl.load(LSE + rows, mask=head_ok, other=float("inf"))
        first, slot_ids, slot_codes, read, rank = _read_slots(CODES, PRIVATE, bh, t, n,
                                                              num_slots, S_PAD, True)
        dq_t = _walk_dq(
            q, do, lse, delta, K_HEAD, V_HEAD, GATES, DGATES, first, slot_ids, slot_codes, read,
            rank, stride_kn, n, num_blocks, block_size, sm_scale, log2_scale, D, BLOCK_K,
            BLOCK_D, HAS_GATES, PRECISION,
        )  # fmt: skip
        dq = tl.where((row_token == j)[:, None], _spread(dq_t, TOKENS), dq)
    return dq


@triton.jit
def _diagonal_visible(j, tokens, row_ok, key_ok, block_size, BLOCK_K: tl.constexpr):
    """(ROWS, BLOCK_K): the rows whose own block is j, each up to its own token."""
    keys = j * block_size + tl.arange(0, BLOCK_K)
    mine = row_ok & (tokens // block_size == j)
    return mine[:, None] & key_ok[None, :] & (keys[None, :] <= tokens[:, None])


@triton.jit
def _tile_forward_kernel(
    Q, K, V, CODES, GATES, UNION, COUNTS, SHARED, PRIVATE, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, TOKENS: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (query tile i, batch b * kv head h): out and log2-sum-exp of its rows, each
    distinct block of the tile loaded once (with SPLIT, the private ones first)."""
    (elsewhere, plan, tokens, row_ok, tile, tile_ok, rows, slot_offsets, slot_ok, codes,
     K_HEAD, V_HEAD) = _tile_program(
        K, V, CODES, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n,
        num_kv_heads, num_slots, num_tiles, G, D, TOKENS, G_PAD, S_PAD, BLOCK_D,
    )  # fmt: skip
    if elsewhere:
        return
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)  # (ROWS, D)
    gates, union, places = _tile_reads(GATES, UNION, plan, slot_offsets, slot_ok, TOKENS, S_PAD,
                                       HAS_GATES)
    if SPLIT:
        m, total, acc = _private_forward(
            Q, K_HEAD, V_HEAD, CODES, GATES, PRIVATE, stride_qb, stride_qh, stride_qn, stride_kn,
            plan, n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, log2_scale, G,
            D, S_PAD, TOKENS, G_PAD, BLOCK_K, BLOCK_D, HAS_GATES, PRECISION,
        )  # fmt: skip
    else:
        m = tl.full([TOKENS * G_PAD], float("-inf"), tl.float32)
        total = tl.zeros([TOKENS * G_PAD], tl.float32)
        acc = tl.zeros([TOKENS * G_PAD, BLOCK_D], tl.float32)
    for u in range(tl.load(COUNTS + plan)):
        block, _, sees, gate = _union_block(union, places, u, num_blocks, codes, gates,
                                            HAS_GATES)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, block, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        m, total, acc = _softmax_step(q, k, v, sees & key_ok[None, :], log2_scale * gate, m,
                                      total, acc, PRECISION)
    if CAUSAL:  # the block-causal diagonals: each row's own block up to its token
        first, last = _own_blocks(plan % num_tiles, n, block_size, TOKENS)
        for j in range(first, last):
            k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, j, n, block_size,
                                      D, BLOCK_K, BLOCK_D)
            visible = _diagonal_visible(j, tokens, row_ok, key_ok, block_size, BLOCK_K)
            m, total, acc = _softmax_step(q, k, v, visible, log2_scale, m, total, acc, PRECISION)
    out, lse = _finish_softmax(m, total, acc)
    tl.store(OUT + tile, out.to(OUT.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + rows, lse, mask=row_ok)


@triton.jit
def _tile_dq_kernel(
    Q, K, V, OUT, DO, LSE, CODES, GATES, UNION, COUNTS, SHARED, PRIVATE, DQ, DGATES, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, num_tiles, block_size, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr, TOKENS: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (query tile i, batch b * kv head h): dq of its rows, d gate of its tokens'
    slots (summed over each token's G heads) and delta, each distinct block loaded once
    (with SPLIT, the private ones first)."""
    (elsewhere, plan, tokens, row_ok, tile, tile_ok, rows, slot_offsets, slot_ok, codes,
     K_HEAD, V_HEAD) = _tile_program(
        K, V, CODES, SHARED, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n,
        num_kv_heads, num_slots, num_tiles, G, D, TOKENS, G_PAD, S_PAD, BLOCK_D,
    )  # fmt: skip
    if elsewhere:
        return
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)
    do = tl.load(DO + tile, mask=tile_ok, other=0.0)
    out = tl.load(OUT + tile, mask=tile_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(DELTA + rows, delta, mask=row_ok)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    gates, union, places = _tile_reads(GATES, UNION, plan, slot_offsets, slot_ok, TOKENS, S_PAD,
                                       HAS_GATES)
    if SPLIT:
        dq = _private_dq(
            Q, K_HEAD, V_HEAD, OUT, DO, LSE, CODES, GATES, PRIVATE, DGATES, stride_qb, stride_qh,
            stride_qn, stride_kn, plan, n, num_kv_heads, num_slots, num_blocks, num_tiles,
            block_size, sm_scale, log2_scale, G, D, S_PAD, TOKENS, G_PAD, BLOCK_K, BLOCK_D,
            HAS_GATES, PRECISION,
        )  # fmt: skip
    else:
        dq = tl.zeros([TOKENS * G_PAD, BLOCK_D], tl.float32)
    dgates = tl.zeros([TOKENS * G_PAD, S_PAD], tl.float32)  # per row and slot
    for u in range(tl.load(COUNTS + plan)):
        block, picked, sees, gate = _union_block(union, places, u, num_blocks, codes, gates,
                                                 HAS_GATES)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, block, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        ds, qk = _gradient_step(q, do, lse, delta, k, v, sees & key_ok[None, :],
                                log2_scale * gate, PRECISION)
        dq += _dot((ds * gate).to(k.dtype), k, PRECISION)
        if HAS_GATES:
            dgates += tl.where(picked, tl.sum(ds * qk, 1)[:, None], 0.0)
    if CAUSAL:
        first, last = _own_blocks(plan % num_tiles, n, block_size, TOKENS)
        for j in range(first, last):
            k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, j, n, block_size,
                                      D, BLOCK_K, BLOCK_D)
            visible = _diagonal_visible(j, tokens, row_ok, key_ok, block_size, BLOCK_K)
            ds, _ = _gradient_step(q, do, lse, delta, k, v, visible, log2_scale, PRECISION)
            dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + tile, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)
    if HAS_GATES:  # each token's G rows summed: (TOKENS, S_PAD)
        per_token = tl.sum(tl.reshape(dgates, (TOKENS, G_PAD, S_PAD)), 1) * sm_scale
        own = (plan % num_tiles) * TOKENS + tl.arange(0, TOKENS)
        slots = tl.arange(0, S_PAD)
        offsets = ((plan // num_tiles) * n + own)[:, None] * num_slots + slots[None, :]
        ok = (own < n)[:, None] & (slots < num_slots)[None, :]
        if SPLIT:  # the private pass stored its slots' own
            ok = ok & (tl.load(PRIVATE + offsets, mask=ok, other=0) == 0)
        tl.store(DGATES + offsets, per_token, mask=ok)


# ---- dk, dv: one program per chunk of a key block's readers -----------------------------


@triton.jit
def _accumulate_dkv(
    q, do, lse, delta, gate, k, v, key_ok, dk, dv, log2_scale, PRECISION: tl.constexpr
):
    """Add one tile of rows (R, D) to the key block's dk, dv (BLOCK_K, D); key_ok (R, BLOCK_K)."""
    qk = _dot(q, tl.trans(k), PRECISION)
    p = tl.where(key_ok, tl.exp2(qk * (log2_scale * gate)[:, None] - lse[:, None]), 0.0)
    dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None]) * gate[:, None]
    dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    return dk, dv


@triton.jit
def _load_reader_rows(Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qn, b, heads, tokens,
                      row_ok, row_lse, dims, dim_ok):
    """Rows (head, token) of q and dO (R, BLOCK_D), and their lse and delta (R,)."""
    ptrs = b * stride_qb + heads[:, None] * stride_qh + tokens[:, None] * stride_qn + dims[None, :]
    ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + ptrs, mask=ok, other=0.0)
    do = tl.load(DO + ptrs, mask=ok, other=0.0)
    lse = tl.load(LSE + row_lse + tokens, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_lse + tokens, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _backward_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, ENTRIES, OFFSETS, OWNERS, PARTS, SLOTS, GATES, DK, DV, PARTIAL,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, block_size, chunk, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program p: chunk PARTS[p] of key block j (batch b * kv head h) = OWNERS[p], that is
    its readers ENTRIES[start + chunk * part : ...], ROWS rows (token, head) at a time.
    The block's only chunk stores dk, dv; a chunk of a split block stores its float32
    partial sums at PARTIAL[SLOTS[p]], for `_sum_partials_kernel`."""
    pid = tl.program_id(0)
    owner = tl.load(OWNERS + pid).to(tl.int64)  # bh * num_blocks + j
    part = tl.load(PARTS + pid).to(tl.int64)
    slot = tl.load(SLOTS + pid).to(tl.int64)
    bh, j = owner // num_blocks, owner % num_blocks
    b, h = bh // num_kv_heads, bh % num_kv_heads
    kv_head = b * stride_kb + h * stride_kh
    k, v, key_ok = _key_block(K + kv_head, V + kv_head, stride_kn, j, n, block_size,
                              D, BLOCK_K, BLOCK_D)
    keys = j * block_size + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)

    row = tl.arange(0, ROWS)
    group_head = row % BLOCK_G
    heads = h * G + group_head
    row_lse = (b * num_kv_heads * G + heads) * n
    start = tl.load(OFFSETS + owner) + part * chunk
    end = tl.minimum(tl.load(OFFSETS + owner + 1), start + chunk)
    for first in range(start, end, ROWS // BLOCK_G):  # this chunk's readers of block j
        entry = first + row // BLOCK_G
        row_ok = (entry < end) & (group_head < G)
        flat = tl.load(ENTRIES + entry, mask=row_ok, other=0).to(tl.int64)  # t * slots + slot
        tokens = flat // num_slots
        q, do, lse, delta = _load_reader_rows(Q, DO, LSE, DELTA, stride_qb, stride_qh, stride_qn,
                                              b, heads, tokens, row_ok, row_lse, dims, dim_ok)
        gate = tl.full([ROWS], 1.0, tl.float32)
        if HAS_GATES:
            gate = tl.load(GATES + bh * n * num_slots + flat, mask=row_ok, other=0.0)
            gate = gate.to(tl.float32)
        visible = row_ok[:, None] & key_ok[None, :]
        dk, dv = _accumulate_dkv(q, do, lse, delta, gate, k, v, visible, dk, dv, log2_scale,
                                 PRECISION)
    if CAUSAL and part == 0:  # the block's own tokens, each up to itself
        last = tl.minimum((j + 1) * block_size, n)
        for first in range(j * block_size, last, ROWS // BLOCK_G):
            tokens = first + row // BLOCK_G
            row_ok = (tokens < last) & (group_head < G)
            q, do, lse, delta = _load_reader_rows(Q, DO, LSE, DELTA, stride_qb, stride_qh,
                                                  stride_qn, b, heads, tokens, row_ok, row_lse,
                                                  dims, dim_ok)
            gate = tl.full([ROWS], 1.0, tl.float32)
            visible = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= tokens[:, None])
            dk, dv = _accumulate_dkv(q, do, lse, delta, gate, k, v, visible, dk, dv, log2_scale,
                                     PRECISION)

    if slot < 0:
        out = kv_head + keys[:, None].to(tl.int64) * stride_kn + dims[None, :]
        store_ok = key_ok[:, None] & dim_ok[None, :]
        tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_ok)
    else:
        tile = tl.arange(0, BLOCK_K)[:, None] * BLOCK_D + dims[None, :]
        tl.store(PARTIAL + (2 * slot) * BLOCK_K * BLOCK_D + tile, dk)
        tl.store(PARTIAL + (2 * slot + 1) * BLOCK_K * BLOCK_D + tile, dv)


@triton.jit
def _sum_partials_kernel(
    PARTIAL, CHUNKS, FIRST, DK, DV, stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_blocks, block_size, sm_scale,
    D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (key block j of batch b * kv head h): where the block was read in CHUNKS > 1
    chunks, the sum of their partial dk, dv from PARTIAL[FIRST] on, in order (so the
    result does not depend on which chunk finished first)."""
    owner = tl.program_id(0).to(tl.int64)
    chunks = tl.load(CHUNKS + owner)
    if chunks < 2:
        return
    first = tl.load(FIRST + owner).to(tl.int64)
    bh, j = owner // num_blocks, owner % num_blocks
    b, h = bh // num_kv_heads, bh % num_kv_heads
    dims = tl.arange(0, BLOCK_D)
    tile = tl.arange(0, BLOCK_K)[:, None] * BLOCK_D + dims[None, :]
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for part in range(chunks):
        dk += tl.load(PARTIAL + (2 * (first + part)) * BLOCK_K * BLOCK_D + tile)
        dv += tl.load(PARTIAL + (2 * (first + part) + 1) * BLOCK_K * BLOCK_D + tile)
    keys = j * block_size + tl.arange(0, BLOCK_K)
    out = b * stride_kb + h * stride_kh + keys[:, None].to(tl.int64) * stride_kn + dims[None, :]
    ok = ((tl.arange(0, BLOCK_K) < block_size) & (keys < n))[:, None] & (dims < D)[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok)


# ---- what the kernels are given: the tile plan, the inverted index ---------------------


@triton.jit
def _private_slots(codes, TOKENS: tl.constexpr, S_PAD: tl.constexpr):
    """(TOKENS, S_PAD): the read slots whose code no other token of the tile reads."""
    flat = tl.reshape(codes, (TOKENS * S_PAD,))
    token = tl.arange(0, TOKENS * S_PAD) // S_PAD
    elsewhere = (flat[:, None] == flat[None, :]) & (token[:, None] != token[None, :])
    alone = (flat >= 0) & (tl.max(elsewhere.to(tl.int32), 1) == 0)
    return tl.reshape(alone, (TOKENS, S_PAD))


@triton.jit
def _plan_kernel(
    INDICES, SELECTED, CODES, UNION, COUNTS, SHARED, PRIVATE, n, num_slots, num_blocks,
    num_tiles, block_size, shared_ratio,
    TOKENS: tl.constexpr, S_PAD: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (query tile i, batch b * head h): the codes of its tokens' slots, its
    distinct codes (with SPLIT: those read by two tokens or more, and each token's
    private ones apart), and which forward kernel takes it (see `plan_tiles`)."""
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    tokens = i * TOKENS + tl.arange(0, TOKENS)
    slots = tl.arange(0, S_PAD)
    offsets = (bh * n + tokens)[:, None] * num_slots + slots[None, :]
    ok = (tokens < n)[:, None] & (slots < num_slots)[None, :]
    blocks = tl.load(INDICES + offsets, mask=ok, other=0).to(tl.int32)  # (TOKENS, S_PAD)
    read = ok & (tl.load(SELECTED + offsets, mask=ok, other=0) != 0)
    if CAUSAL:  # the diagonal covers the own block; later blocks are the future
        read = read & (blocks < (tokens // block_size)[:, None])
    # a block the token read in an earlier slot too: its code counts those slots
    same = (blocks[:, :, None] == blocks[:, None, :]) & read[:, None, :]
    same = same & (slots[None, None, :] < slots[None, :, None])
    codes = tl.where(read, blocks + num_blocks * tl.sum(same.to(tl.int32), 2), -1)
    tl.store(CODES + offsets, codes, mask=ok)
    reads = tl.sum(tl.sum(read.to(tl.int32), 1), 0)

    plan = bh * num_tiles + i
    private_work = 0.0  # private slots, in tiles' worth of rows (one token's rows each)
    if SPLIT:
        private = _private_slots(codes, TOKENS, S_PAD)
        tl.store(PRIVATE + offsets, private.to(tl.uint8), mask=ok)
        private_work = tl.sum(tl.sum(private.to(tl.float32), 1), 0) / TOKENS
        codes = tl.where(private, -1, codes)  # the rest make the tile's shared list

    flat = tl.sort(tl.reshape(codes, (TOKENS * S_PAD,)))  # unread slots (-1) first
    position = tl.arange(0, TOKENS * S_PAD)
    before = tl.gather(flat, tl.maximum(position - 1, 0), 0)
    first = (flat >= 0) & ((position == 0) | (flat != before))
    place = tl.cumsum(first.to(tl.int32), 0) - 1
    tl.store(UNION + plan * TOKENS * S_PAD + place, flat, mask=first)
    count = tl.sum(first.to(tl.int32), 0)
    tl.store(COUNTS + plan, count)
    tl.store(SHARED + plan, (count + private_work <= shared_ratio * reads).to(tl.uint8))


@dataclass(frozen=True)
class TilePlan:
    """Which query tiles the shared-tile kernels take and what they read.

    codes (b, h, n, s) int32: each slot's code, its block + num_blocks * how many earlier
    slots of the token read the same block, NO_BLOCK where not read (a block a token
    lists twice counts twice, as in the PyTorch path: the codes keep the two apart);
    union (b * h, tiles, TOKENS * S_PAD) int32: each tile's distinct codes first (with
    split, only those that two tokens or more read); counts (b * h, tiles) int32: how
    many; shared (b * h, tiles) uint8: 1 where the tile goes to the shared-tile kernels,
    0 where each token walks its own blocks; private (b, h, n, s) uint8, with split: 1
    on the read slots whose code no other token of the tile reads (without split, one 0
    that no kernel reads).
    """

    codes: Tensor
    union: Tensor
    counts: Tensor
    shared: Tensor
    private: Tensor
    tokens: int  # tokens per tile
    split: bool


def plan_tiles(
    indices: Tensor, selected: Tensor, *, block_size: int, causal: bool, tokens: int,
    rows: int, block_g: int, limit: float, split: bool = False,
) -> TilePlan:  # fmt: skip
    """What the forward and dq kernels are given, in one pass over the selection.

    Each tile of `tokens` queries merges its tokens' read blocks (the slots that are
    selected and, with causal, before the own block) into one list of distinct codes.
    With `split`, a code only one token of the tile reads is left out of that list and
    marked private: the tile kernels run it on that token's rows alone, `rows / tokens`
    of them, as the walk does.

    A tile goes to the shared-tile kernels where their work, (distinct blocks) x `rows`
    plus (private slots) x `rows / tokens`, is at most `limit` times the per-token
    walk's, (read slots) x `block_g`.
    """
    b, h, n, s = indices.shape
    num_tiles = triton.cdiv(n, tokens)
    s_pad = _slots_padded(indices)
    device = indices.device
    codes = torch.empty(b, h, n, s, dtype=torch.int32, device=device)
    union = torch.empty(b * h, num_tiles, tokens * s_pad, dtype=torch.int32, device=device)
    counts = torch.empty(b * h, num_tiles, dtype=torch.int32, device=device)
    shared = torch.empty(b * h, num_tiles, dtype=torch.uint8, device=device)
    private = torch.empty(b, h, n, s, dtype=torch.uint8, device=device) if split else shared
    _plan_kernel[(num_tiles, b * h)](
        indices, selected.view(torch.uint8), codes, union, counts, shared, private, n, s,
        math.ceil(n / block_size), num_tiles, block_size, limit * block_g / rows,
        TOKENS=tokens, S_PAD=s_pad, CAUSAL=causal, SPLIT=split,
    )  # fmt: skip
    return TilePlan(codes, union, counts, shared, private, tokens, split)


def invert_selection(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """For each key block, the (token, slot) pairs that read it: the backward's index.

    blocks (b, h, n, s) -> entries, offsets: block j of batch-head bh is read by the
    entries[offsets[bh * num_blocks + j] : offsets[bh * num_blocks + j + 1]], each a
    position t * s + slot within that batch-head, in increasing token order.
    """
    batch_heads = blocks.shape[0] * blocks.shape[1]
    per_head = rearrange(blocks, "b h n s -> (b h) (n s)").int()
    first_key = torch.arange(batch_heads, device=blocks.device, dtype=torch.int32)[:, None]
    first_key = first_key * num_blocks
    key = torch.where(per_head >= 0, per_head + first_key, batch_heads * num_blocks).flatten()
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(batch_heads * num_blocks + 1, dtype=torch.int64, device=key.device)
    counts = counts.index_add_(0, key, torch.ones_like(key, dtype=torch.int64))[:-1]
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)
    entries = (order % per_head.shape[1]).to(torch.int32)
    return entries, offsets


@dataclass(frozen=True)
class Chunks:
    """The dk, dv kernel's programs: program p works on chunk parts[p] of key block
    owners[p] (= bh * num_blocks + j) and, where that block is split, leaves its partial
    sums at slots[p] (-1: the block's only chunk stores dk, dv itself). Per key block:
    its number of chunks and its first partial slot. `num_partials` slots in all."""

    owners: Tensor
    parts: Tensor
    slots: Tensor
    chunks: Tensor
    first: Tensor
    num_partials: int


def chunk_readers(offsets: Tensor, chunk: int) -> Chunks:
    """Cut each key block's readers (inverted index `offsets`) into chunks of at most
    `chunk`, so that a block every token reads does not run as one long program."""
    readers = (offsets[1:] - offsets[:-1]).long()
    chunks = ((readers + chunk - 1) // chunk).clamp_min(1)  # read by none: its diagonal
    ends = chunks.cumsum(0)
    partials = torch.where(chunks > 1, chunks, 0)
    first = partials.cumsum(0) - partials
    num_programs, num_partials = torch.stack((ends[-1], partials.sum())).tolist()  # a wait
    program = torch.arange(num_programs, device=offsets.device)
    owners = torch.searchsorted(ends, program, right=True)
    parts = program - (ends - chunks)[owners]
    slots = torch.where(chunks[owners] > 1, first[owners] + parts, -1)
    return Chunks(owners.int(), parts.int(), slots.int(), chunks.int(), first.int(),
                  num_partials)


# ---- launching ------------------------------------------------------------------------


def _tile_sizes(block_size: int, group: int, dim: int) -> dict[str, int]:
    """Power-of-two tiles (at least 16 for tl.dot) covering a block, a group, a head."""
    return {
        "BLOCK_K": max(16, triton.next_power_of_2(block_size)),
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
    }


def tile_tokens(group: int, dim: int) -> int:
    """Tokens per query tile: enough for the tile_forward launch's rows (token, head) at
    heads `dim` wide, each token's G heads padded to a power of two."""
    return max(1, launch_settings("tile_forward", dim).rows // triton.next_power_of_2(group))


def _slots_padded(codes: Tensor) -> int:
    """The slots s of each token, rounded up to a power of two for tl.arange."""
    return triton.next_power_of_2(max(1, codes.shape[-1]))


def _precision(dtype: torch.dtype) -> str:
    """How the kernels multiply: float32 in full precision (tf32 would cost ~1e-3), halves
    on the tensor cores, bfloat16 upcast in the interpreter (see `_dot`)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and triton_mode() == "interpreter" else "tf32"


def _settings(q, k, plan, gates, block_size, causal) -> tuple[tuple, dict, dict]:
    """What the forward and dq kernels share: (n, hk, s, num_blocks, tiles, block_size) and
    the walk's and the tiles' compile-time settings."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    slots = plan.codes.shape[-1]
    sizes = (n, hk, slots, math.ceil(n / block_size), plan.counts.shape[1], block_size)
    common = dict(G=group, D=d, S_PAD=_slots_padded(plan.codes), TOKENS=plan.tokens,
                  HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype))
    tiles = _tile_sizes(block_size, group, d)
    walk = dict(common, **tiles)
    shared = dict(common, G_PAD=triton.next_power_of_2(group), BLOCK_K=tiles["BLOCK_K"],
                  BLOCK_D=tiles["BLOCK_D"])
    return sizes, walk, shared


def _launch(kernel: Kernel, d: int) -> dict[str, int]:
    launch = launch_settings(kernel, d)
    return {"num_warps": launch.num_warps, "num_stages": launch.num_stages}


def _forward(q, k, v, plan, gates, block_size, causal, scale):
    """out (b, hq, n, d) and each row's log-sum-exp (b, hq, n), in log2 units, for backward:
    the shared tiles, then the walk over the other tokens."""
    b, hq, n, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    sizes, walk, shared = _settings(q, k, plan, gates, block_size, causal)
    gates = plan.codes if gates is None else gates  # a pointer the kernels never read
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    grid = (plan.counts.shape[1], plan.counts.shape[0])
    _tile_forward_kernel[grid](
        q, k, v, plan.codes, gates, plan.union, plan.counts, plan.shared, plan.private,
        out, lse, *strides, *sizes, scale * LOG2_E, **shared, SPLIT=plan.split,
        **_launch("tile_forward", d),
    )
    _forward_kernel[(n, plan.counts.shape[0])](
        q, k, v, plan.codes, gates, plan.shared, out, lse, *strides, *sizes, scale * LOG2_E,
        **walk, **_launch("forward", d),
    )
    return out, lse


def _backward_dq(q, k, v, out, do, lse, plan, gates, block_size, causal, scale):
    """dq (b, hq, n, d), d gates (b, hk, n, s) in float32 (with gates) and delta (b, hq, n)."""
    n, d = q.shape[-2:]
    dq = torch.empty_like(q)
    dgates = None if gates is None else torch.zeros_like(gates, dtype=torch.float32)
    delta = torch.empty_like(lse)
    sizes, walk, shared = _settings(q, k, plan, gates, block_size, causal)
    gates, dgates_arg = (plan.codes, plan.codes) if gates is None else (gates, dgates)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    grid = (plan.counts.shape[1], plan.counts.shape[0])
    _tile_dq_kernel[grid](
        q, k, v, out, do, lse, plan.codes, gates, plan.union, plan.counts, plan.shared,
        plan.private, dq, dgates_arg, delta, *strides, *sizes, scale, scale * LOG2_E,
        **shared, SPLIT=plan.split, **_launch("tile_dq", d),
    )
    _backward_dq_kernel[(n, plan.counts.shape[0])](
        q, k, v, out, do, lse, plan.codes, gates, plan.shared, dq, dgates_arg, delta, *strides,
        *sizes, scale, scale * LOG2_E, **walk, **_launch("dq", d),
    )
    return dq, dgates, delta


def _backward_dkv(q, k, v, do, lse, delta, num_slots, gates, block_size, causal, scale, index):
    """dk, dv (b, hk, n, d) from the inverted index (entries, offsets), by chunks of readers."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    tiles = _tile_sizes(block_size, hq // hk, d)
    num_blocks = math.ceil(n / block_size)
    entries, offsets = index
    launch = launch_settings("dkv", d)
    chunks = chunk_readers(offsets, launch.chunk)
    partial = torch.empty(max(1, 2 * chunks.num_partials * tiles["BLOCK_K"] * tiles["BLOCK_D"]),
                          dtype=torch.float32, device=q.device)  # fmt: skip
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    k_strides = (k.stride(0), k.stride(1), k.stride(2))
    _backward_dkv_kernel[(chunks.owners.numel(),)](
        q, k, v, do, lse, delta, entries, offsets, chunks.owners, chunks.parts, chunks.slots,
        q if gates is None else gates, dk, dv, partial,
        q.stride(0), q.stride(1), q.stride(2), *k_strides,
        n, hk, num_slots, num_blocks, block_size, launch.chunk, scale, scale * LOG2_E,
        G=hq // hk, D=d, ROWS=max(launch.rows, tiles["BLOCK_G"]), **tiles,
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if chunks.num_partials:
        _sum_partials_kernel[(chunks.chunks.numel(),)](
            partial, chunks.chunks, chunks.first, dk, dv, *k_strides, n, hk, num_blocks,
            block_size, scale, D=d, BLOCK_K=tiles["BLOCK_K"], BLOCK_D=tiles["BLOCK_D"],
        )
    return dk, dv


def _backward(do, q, k, v, out, lse, plan, gates, block_size, causal, scale):
    """All four gradients: dq (and d gates) by tile or token, dk and dv by key block."""
    dq, dgates, delta = _backward_dq(q, k, v, out, do, lse, plan, gates, block_size, causal, scale)
    num_blocks = math.ceil(q.shape[-2] / block_size)
    blocks = torch.where(plan.codes >= 0, plan.codes % num_blocks, NO_BLOCK)
    index = invert_selection(blocks, num_blocks)
    dk, dv = _backward_dkv(
        q, k, v, do, lse, delta, blocks.shape[-1], gates, block_size, causal, scale, index
    )
    return dq, dk, dv, dgates


def make_plan(indices: Tensor, selected: Tensor, group: int, block_size: int, dim: int,
              causal: bool) -> TilePlan:
    """`plan_tiles` with the tile_forward launch's tiles for G = `group` query heads per
    selection, heads `dim` wide, and the cost limit TILE_COST_LIMIT; private blocks apart
    (SPLIT_PRIVATE) where a tile has several tokens of at least 16 rows each (tl.dot's
    least)."""
    tokens = tile_tokens(group, dim)
    group_rows = triton.next_power_of_2(group)
    return plan_tiles(
        indices, selected, block_size=block_size, causal=causal, tokens=tokens,
        rows=tokens * group_rows, block_g=_tile_sizes(block_size, group, dim)["BLOCK_G"],
        limit=TILE_COST_LIMIT, split=SPLIT_PRIVATE and tokens > 1 and group_rows >= 16,
    )  # fmt: skip


class SelectionAttention(torch.autograd.Function):
    """The Triton forward and backward as one autograd step."""

    @staticmethod
    def forward(ctx, q, k, v, indices, selected, gates, block_size, causal, scale):
        plan = make_plan(indices, selected, q.shape[1] // k.shape[1], block_size, q.shape[-1],
                         causal)
        out, lse = _forward(q, k, v, plan, gates, block_size, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, gates, plan.codes, plan.union, plan.counts,
                              plan.shared, plan.private)
        ctx.settings = (plan.tokens, plan.split, block_size, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, gates, *plan = ctx.saved_tensors
        tokens, split, *settings = ctx.settings
        dq, dk, dv, dgates = _backward(do.contiguous(), q, k, v, out, lse,
                                       TilePlan(*plan, tokens, split), gates, *settings)
        dgates = None if dgates is None else dgates.to(gates.dtype)
        return dq, dk, dv, None, None, dgates, None, None, None


def selection_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool = True, gates: Tensor | None = None, scale: float | None = None,
    check_indices: bool = True,
) -> Tensor:  # fmt: skip
    """Selected-block attention in Triton: q (b, hq, n, d), k and v (b, hk, n, d) -> (b, hq, n, d).

    Query t attends to the keys of its selected blocks and, when causal, to its own block
    up to itself. Differentiable in q, k, v and gates. A query that sees no key gets zeros.

    Args:
        indices: (b, hk, n, s), one selection shared by each GQA group, or (b, hq, n, s),
            one per query head; int64 (or int32) block numbers.
        selected: bool, indices' shape: whether each slot is read.
        block_size: keys per block (the paper's l').
        causal: add the block-causal diagonal, the own block up to the query itself; then
            only selected blocks before the own one count.
        gates: float, indices' shape: multiplies the logits of each selected block (the
            diff-topk gates).
        scale: the softmax scale, d ** -0.5 by default.
        check_indices: False skips the range check of the selected indices, which waits
            for the GPU (top-k indices are in range by construction).
    """
    _check_inputs(q, k, v, indices, selected, block_size, gates, check_indices)
    require_runnable_kernels()
    hq, hk, selection_heads = q.shape[1], k.shape[1], indices.shape[1]
    if selection_heads != hk:  # one selection per query head: each head is its own group
        k, v = (repeat(t, "b h n d -> b (h g) n d", g=hq // hk) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.contiguous() for t in (q, k, v))
    indices, selected = indices.contiguous(), selected.contiguous()
    gates = None if gates is None else gates.contiguous()
    return SelectionAttention.apply(q, k, v, indices, selected, gates, block_size, causal, scale)


def _check_inputs(q, k, v, indices, selected, block_size, gates, check_indices):
    """Clear errors for every rule the kernels rely on."""
    check_attention_tensors(q, k, v, ("k", "v"), ("b", "hk", "n", "d"))
    b, hq, n, d = q.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if indices.dim() != 4 or indices.shape[1] not in (k.shape[1], hq) or (
        indices.shape[0], indices.shape[2]) != (b, n):
        raise ValueError(
            f"indices must be (b, hk, n, s) or (b, hq, n, s) = ({b}, {k.shape[1]} or "
            f"{hq}, {n}, s), got {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 (or int32), got {indices.dtype}")
    if selected.shape != indices.shape or selected.dtype != torch.bool:
        raise ValueError(
            f"selected must be a bool tensor of indices' shape {tuple(indices.shape)}, "
            f"got {selected.dtype} {tuple(selected.shape)}"
        )
    if gates is not None and (gates.shape != indices.shape or not gates.is_floating_point()):
        raise ValueError(
            f"gates must be a float tensor of indices' shape {tuple(indices.shape)}, "
            f"got {gates.dtype} {tuple(gates.shape)}"
        )
    require_kernel_device(q=q, k=k, v=v, indices=indices, selected=selected, gates=gates)
    if check_indices:
        _check_index_range(indices, selected, n, block_size)


def _check_index_range(indices: Tensor, selected: Tensor, n: int, block_size: int) -> None:
    """Every selected index names a block of the sequence (this waits for the GPU)."""
    num_blocks = math.ceil(n / block_size)
    outside = selected & ((indices < 0) | (indices >= num_blocks))
    if outside.any():  # a small reduction, then a wait for the GPU: reading past k is worse
        raise ValueError(
            f"selected indices must lie in [0, {num_blocks}) (ceil(n / block_size) with "
            f"n={n}, block_size={block_size}), got {int(indices[outside][0])}"
        )
