"""Stages 08-09: the selection branch as Triton kernels (paper §3.4, Kernel Design, Fig. 3).

Forward: one program per (token, kv head) holds the G query heads of that GQA group
and walks the token's selected key/value blocks, so each block is read once for all G
heads (the paper's group-centric layout), with an online softmax over the blocks.

Backward, three steps (notebook 09):
- dq (and the gradient of the diff-topk gates): the same walk as the forward;
- an inverted index: for each key block, the (token, slot) pairs that selected it;
- dk, dv: one program per key block gathers the queries of its index in tiles of
  rows (token, head) and accumulates; heavy early blocks are launched first.

The forward and dq kernels share their start (`_group_program`, `_read_slots`) and
every kernel loads its key/value blocks through `_key_block`, the way Triton's
fused-attention tutorial shares one inner helper between its stages.

The semantics are `fine_attention_gathered` of `nsa_tutorial.fine_attention`, except
that a query that sees no key at all (possible only without the block-causal diagonal)
gets zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import triton
import triton.language as tl
from einops import rearrange, repeat
from torch import Tensor

from nsa_tutorial.kernels import check_attention_tensors, require_runnable_kernels, triton_mode

LOG2_E = math.log2(math.e)  # the kernels use exp2: logits are scaled by scale * LOG2_E
NO_BLOCK = -1  # a slot of `blocks` that attends nothing
Kernel = Literal["forward", "dq", "dkv"]


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched: warps per program and software-pipelining depth
    (num_stages=2: the next key block loads while this one is computed)."""

    num_warps: int
    num_stages: int
    rows: int = 0  # dk, dv kernel only: rows (token, head) per tile of queries


# Chosen on an H200 (benchmarks/selection_kernel_gpu.py --sweep; notebook 09 plots it).
LAUNCH: dict[Kernel, Launch] = {
    "forward": Launch(num_warps=2, num_stages=2),
    "dq": Launch(num_warps=2, num_stages=2),
    "dkv": Launch(num_warps=4, num_stages=2, rows=64),
}


def launch_settings(kernel: Kernel, dim: int) -> Launch:
    """`kernel`'s settings from LAUNCH for heads `dim` wide: heads over 128 wide get one
    stage, so that their blocks fit in shared memory."""
    return replace(LAUNCH[kernel], num_stages=1) if dim > 128 else LAUNCH[kernel]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation; "upcast" multiplies in float32 instead (Triton
    3.7's interpreter gets bfloat16 dots wrong; bfloat16 -> float32 is exact)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _group_program(
    K, V, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Where program (token t, batch b * kv head h) of the forward and dq kernels works:
    the G query heads h*G .. h*G+G-1 of the group as the rows of one tile (Fig. 3).

    Returns t and bh; the tile's offsets (BLOCK_G, BLOCK_D) in a (b, hq, n, d) tensor
    (q, out, dO, dq) and which of them are real; each row's offset (BLOCK_G,) in a
    (b, hq, n) tensor (lse, delta) and which rows are heads; the group's key and value
    head.
    """
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_kv_heads, bh % num_kv_heads
    heads = h * G + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < G
    dims = tl.arange(0, BLOCK_D)
    tile = b * stride_qb + heads[:, None] * stride_qh + t * stride_qn + dims[None, :]
    tile_ok = head_ok[:, None] & (dims < D)[None, :]
    rows = (b * num_kv_heads * G + heads) * n + t
    kv_head = b * stride_kb + h * stride_kh
    return t, bh, tile, tile_ok, rows, head_ok, K + kv_head, V + kv_head


@triton.jit
def _read_slots(INDICES, MASK, bh, t, n, num_slots, block_size, S_PAD: tl.constexpr,
                CAUSAL: tl.constexpr):
    """Token t's slots: the offset `first` of the first in INDICES, MASK (and the gates),
    then as vectors (S_PAD,): slot, block index, whether it is read, and its rank among
    the read ones. The loop then visits only read slots, with no branch that would stop
    Triton from loading the next block while it works on this one."""
    first = (bh * n + t) * num_slots
    slot = tl.arange(0, S_PAD)
    exists = slot < num_slots
    blocks = tl.load(INDICES + first + slot, mask=exists, other=0).to(tl.int32)
    read = (tl.load(MASK + first + slot, mask=exists, other=0) != 0) & exists
    if CAUSAL:  # the diagonal covers the own block; later blocks are the future
        read = read & (blocks < t // block_size)
    rank = tl.cumsum(read.to(tl.int32), 0) - 1
    return first, slot, blocks, read, rank


@triton.jit
def _pick_slot(slot_ids, slot_blocks, read, rank, i):
    """The i-th read slot of `_read_slots`' vectors: (block index, slot)."""
    picked = read & (rank == i)
    return tl.sum(tl.where(picked, slot_blocks, 0), 0), tl.sum(tl.where(picked, slot_ids, 0), 0)


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
def _softmax_step(q, k, v, key_ok, log2_scale, m, total, acc, PRECISION: tl.constexpr):
    """One key block of an online softmax: rows q (R, D) against k, v (BLOCK_K, D).

    Logits are in log2 units (log2_scale = scale * log2 e, times the gate); m is the
    running max, total the running sum and acc the running numerator; rows that saw
    nothing keep m = -inf.
    """
    s = _dot(q, tl.trans(k), PRECISION) * log2_scale  # (R, BLOCK_K)
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, total, acc


@triton.jit
def _forward_kernel(
    Q, K, V, INDICES, MASK, GATES, OUT, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, block_size, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): out and log2-sum-exp of heads h*G .. h*G+G-1."""
    t, bh, tile, tile_ok, rows, head_ok, K_HEAD, V_HEAD = _group_program(
        K, V, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
        G, D, BLOCK_G, BLOCK_D,
    )
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)  # (G, D)
    first, slot_ids, slot_blocks, read, rank = _read_slots(
        INDICES, MASK, bh, t, n, num_slots, block_size, S_PAD, CAUSAL
    )

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(tl.sum(read.to(tl.int32), 0)):
        block, slot = _pick_slot(slot_ids, slot_blocks, read, rank, i)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, block, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        scale = log2_scale
        if HAS_GATES:
            scale = log2_scale * tl.load(GATES + first + slot).to(tl.float32)
        m, total, acc = _softmax_step(q, k, v, key_ok, scale, m, total, acc, PRECISION)
    if CAUSAL:  # the block-causal diagonal: the own block up to the token itself
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, t // block_size, t + 1, block_size,
                                  D, BLOCK_K, BLOCK_D)
        m, total, acc = _softmax_step(q, k, v, key_ok, log2_scale, m, total, acc, PRECISION)

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("inf"))
    tl.store(OUT + tile, out.to(OUT.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + rows, lse, mask=head_ok)


@triton.jit
def _gradient_step(q, do, lse, delta, k, v, key_ok, log2_scale, PRECISION: tl.constexpr):
    """Rows (R, D) against one key block: dL/dlogit ds (R, BLOCK_K) and the raw dot
    products qk (the gates' gradient needs them)."""
    qk = _dot(q, tl.trans(k), PRECISION)
    p = tl.exp2(qk * log2_scale - lse[:, None])
    p = tl.where(key_ok[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return ds, qk


@triton.jit
def _backward_dq_kernel(
    Q, K, V, OUT, DO, LSE, INDICES, MASK, GATES, DQ, DGATES, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, block_size, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): dq of the group's heads and, with gates,
    d gate for each of the token's slots (summed over the group's heads); also stores
    delta = rowsum(dO * O) for the dk, dv kernel."""
    t, bh, tile, tile_ok, rows, head_ok, K_HEAD, V_HEAD = _group_program(
        K, V, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, n, num_kv_heads,
        G, D, BLOCK_G, BLOCK_D,
    )
    q = tl.load(Q + tile, mask=tile_ok, other=0.0)
    do = tl.load(DO + tile, mask=tile_ok, other=0.0)
    out = tl.load(OUT + tile, mask=tile_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)  # softmax backward's rowsum(dO * O)
    tl.store(DELTA + rows, delta, mask=head_ok)  # for the dk, dv kernel
    lse = tl.load(LSE + rows, mask=head_ok, other=float("inf"))
    first, slot_ids, slot_blocks, read, rank = _read_slots(
        INDICES, MASK, bh, t, n, num_slots, block_size, S_PAD, CAUSAL
    )

    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(tl.sum(read.to(tl.int32), 0)):  # a slot not read keeps gate gradient 0
        block, slot = _pick_slot(slot_ids, slot_blocks, read, rank, i)
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, block, n, block_size,
                                  D, BLOCK_K, BLOCK_D)
        gate = 1.0
        if HAS_GATES:
            gate = tl.load(GATES + first + slot).to(tl.float32)
        ds, qk = _gradient_step(q, do, lse, delta, k, v, key_ok, log2_scale * gate, PRECISION)
        dq += _dot((ds * gate).to(k.dtype), k, PRECISION)
        if HAS_GATES:
            tl.store(DGATES + first + slot, tl.sum(tl.sum(ds * qk, 1), 0) * sm_scale)
    if CAUSAL:  # the block-causal diagonal: the own block up to the token itself
        k, v, key_ok = _key_block(K_HEAD, V_HEAD, stride_kn, t // block_size, t + 1, block_size,
                                  D, BLOCK_K, BLOCK_D)
        ds, _ = _gradient_step(q, do, lse, delta, k, v, key_ok, log2_scale, PRECISION)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + tile, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


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
    Q, K, V, DO, LSE, DELTA, ENTRIES, OFFSETS, GATES, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, num_blocks, block_size, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (key block j, batch b * kv head h), j slowest so early (heavy) blocks start
    first: dk, dv of the block from the rows that attended it, ROWS at a time."""
    pid = tl.program_id(0).to(tl.int64)
    num_bh = tl.num_programs(0).to(tl.int64) // num_blocks
    j, bh = pid // num_bh, pid % num_bh
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
    start = tl.load(OFFSETS + bh * num_blocks + j)
    end = tl.load(OFFSETS + bh * num_blocks + j + 1)
    for first in range(start, end, ROWS // BLOCK_G):  # the tokens that selected block j
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
    if CAUSAL:  # the block's own tokens, each up to itself
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

    out = kv_head + keys[:, None].to(tl.int64) * stride_kn + dims[None, :]
    store_ok = key_ok[:, None] & dim_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_ok)


def visible_blocks(indices: Tensor, selected: Tensor, *, block_size: int, causal: bool) -> Tensor:
    """The blocks each query reads, (b, h, n, s) int32, NO_BLOCK where it reads none.

    A slot is dropped where `selected` is False and, with the block-causal diagonal
    (causal), where the block is not strictly before the query's own (the diagonal
    covers the own block; later blocks are the future).
    """
    keep = selected
    if causal:
        own = torch.arange(indices.shape[-2], device=indices.device) // block_size
        keep = keep & (indices < own[:, None])
    return torch.where(keep, indices, NO_BLOCK).to(torch.int32)


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
    counts = torch.bincount(key, minlength=batch_heads * num_blocks + 1)[:-1]
    offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)
    entries = (order % per_head.shape[1]).to(torch.int32)
    return entries, offsets


def _tile_sizes(block_size: int, group: int, dim: int) -> dict[str, int]:
    """Power-of-two tiles (at least 16 for tl.dot) covering a block, a group, a head."""
    return {
        "BLOCK_K": max(16, triton.next_power_of_2(block_size)),
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
    }


def _slots_padded(indices: Tensor) -> int:
    """The slots s of each token, rounded up to a power of two for tl.arange."""
    return triton.next_power_of_2(max(1, indices.shape[-1]))


def _precision(dtype: torch.dtype) -> str:
    """How the kernels multiply: float32 in full precision (tf32 would cost ~1e-3), halves
    on the tensor cores, bfloat16 upcast in the interpreter (see `_dot`)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and triton_mode() == "interpreter" else "tf32"


def _forward(q, k, v, indices, mask, gates, block_size, causal, scale):
    """out (b, hq, n, d) and each row's log-sum-exp (b, hq, n), in log2 units, for backward."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    launch = launch_settings("forward", d)
    _forward_kernel[(n, b * hk)](
        q, k, v, indices, mask, q if gates is None else gates, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, indices.shape[-1], block_size, scale * LOG2_E,
        G=hq // hk, D=d, S_PAD=_slots_padded(indices), **_tile_sizes(block_size, hq // hk, d),
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out, lse


def _backward_dq(q, k, v, out, do, lse, indices, mask, gates, block_size, causal, scale):
    """dq (b, hq, n, d), d gates (b, hk, n, s) in float32 (with gates) and delta (b, hq, n)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    dq = torch.empty_like(q)
    dgates = None if gates is None else torch.zeros_like(gates, dtype=torch.float32)
    delta = torch.empty_like(lse)
    launch = launch_settings("dq", d)
    _backward_dq_kernel[(n, b * hk)](
        q, k, v, out, do, lse, indices, mask, q if gates is None else gates, dq,
        q if dgates is None else dgates, delta,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, indices.shape[-1], block_size, scale, scale * LOG2_E,
        G=hq // hk, D=d, S_PAD=_slots_padded(indices), **_tile_sizes(block_size, hq // hk, d),
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dq, dgates, delta


def _backward_dkv(q, k, v, do, lse, delta, blocks, gates, block_size, causal, scale, index):
    """dk, dv (b, hk, n, d) from the inverted index (entries, offsets) of `blocks`."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    tiles = _tile_sizes(block_size, hq // hk, d)
    num_blocks = math.ceil(n / block_size)
    entries, offsets = index
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    launch = launch_settings("dkv", d)
    _backward_dkv_kernel[(num_blocks * b * hk,)](
        q, k, v, do, lse, delta, entries, offsets, q if gates is None else gates, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, blocks.shape[-1], num_blocks, block_size, scale, scale * LOG2_E,
        G=hq // hk, D=d, ROWS=max(launch.rows, tiles["BLOCK_G"]), **tiles,
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dk, dv


def _backward(do, q, k, v, out, lse, indices, mask, gates, block_size, causal, scale):
    """All four gradients: dq (and d gates) by token, dk and dv by key block."""
    dq, dgates, delta = _backward_dq(
        q, k, v, out, do, lse, indices, mask, gates, block_size, causal, scale
    )
    blocks = visible_blocks(indices, mask.view(torch.bool), block_size=block_size, causal=causal)
    index = invert_selection(blocks, math.ceil(q.shape[-2] / block_size))
    dk, dv = _backward_dkv(
        q, k, v, do, lse, delta, blocks, gates, block_size, causal, scale, index
    )
    return dq, dk, dv, dgates


class SelectionAttention(torch.autograd.Function):
    """The Triton forward and backward as one autograd step. `mask` is `selected` viewed
    as uint8 (the kernels load bytes; a bool tensor cannot be passed to Triton as is)."""

    @staticmethod
    def forward(ctx, q, k, v, indices, mask, gates, block_size, causal, scale):
        out, lse = _forward(q, k, v, indices, mask, gates, block_size, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, indices, mask, gates)
        ctx.settings = (block_size, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, indices, mask, gates = ctx.saved_tensors
        dq, dk, dv, dgates = _backward(do.contiguous(), q, k, v, out, lse, indices, mask, gates,
                                       *ctx.settings)
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
    indices, mask = indices.contiguous(), selected.contiguous().view(torch.uint8)
    gates = None if gates is None else gates.contiguous()
    return SelectionAttention.apply(q, k, v, indices, mask, gates, block_size, causal, scale)


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
    devices = {t.device for t in (q, k, v, indices, selected)}
    if len(devices) > 1 or (gates is not None and gates.device not in devices):
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if check_indices:
        _check_index_range(indices, selected, n, block_size)
    if triton_mode() == "compiled" and q.device.type != "cuda":
        raise ValueError(
            f"with a GPU, Triton compiles the kernels for it: move the tensors to the GPU "
            f"(they are on {q.device})"
        )


def _check_index_range(indices: Tensor, selected: Tensor, n: int, block_size: int) -> None:
    """Every selected index names a block of the sequence (this waits for the GPU)."""
    num_blocks = math.ceil(n / block_size)
    outside = selected & ((indices < 0) | (indices >= num_blocks))
    if outside.any():  # a small reduction, then a wait for the GPU: reading past k is worse
        raise ValueError(
            f"selected indices must lie in [0, {num_blocks}) (ceil(n / block_size) with "
            f"n={n}, block_size={block_size}), got {int(indices[outside][0])}"
        )
