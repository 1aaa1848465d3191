"""Stages 08-09: the selection branch as Triton kernels (paper §3.3.3, Fig. 3).

Forward: one program per (token, kv head) holds the G query heads of that GQA group
and walks the token's selected key/value blocks, so each block is read once for all G
heads (the paper's group-centric layout), with an online softmax over the blocks.

Backward, three steps (notebook 09):
- dq (and the gradient of the diff-topk gates): the same walk as the forward;
- an inverted index: for each key block, the (token, slot) pairs that selected it;
- dk, dv: one program per key block gathers the queries of its index in tiles of
  rows (token, head) and accumulates; heavy early blocks are launched first.

The semantics are `fine_attention_gathered` of `nsa_tutorial.selection`, except that
a query that sees no key at all (possible only without the block-causal diagonal)
gets zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from einops import rearrange, repeat
from torch import Tensor

from nsa_tutorial.kernels import require_runnable_kernels, triton_mode

LOG2_E = 1.4426950408889634
NO_BLOCK = -1  # a slot of `blocks` that attends nothing
# Tiles and launch settings chosen on an H200 (benchmarks/selection_kernel_gpu.py, notebook 09):
DKV_ROWS = 64  # rows (token, head) per tile of the dk/dv kernel
LAUNCH = {  # warps and software-pipelining depth per kernel
    "forward": {"num_warps": 2, "num_stages": 2},
    "dq": {"num_warps": 2, "num_stages": 2},
    "dkv": {"num_warps": 4, "num_stages": 2},
}


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with float32 accumulation; "upcast" multiplies in float32 instead (Triton
    3.7's interpreter gets bfloat16 dots wrong; bfloat16 -> float32 is exact)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_block(base, stride_n, keys, key_ok, dims, dim_ok):
    """Rows `keys` (BLOCK_K,) of a (n, d) matrix at `base` -> (BLOCK_K, BLOCK_D)."""
    ptrs = base + keys[:, None].to(tl.int64) * stride_n + dims[None, :]
    return tl.load(ptrs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _read_slots(INDICES, MASK, first, t, num_slots, block_size, S_PAD: tl.constexpr,
                CAUSAL: tl.constexpr):
    """A token's slots as vectors (S_PAD,): block index, whether it is read, and its rank
    among the read ones. The loop then visits only read slots, with no branch that would
    stop Triton from loading the next block while it works on this one."""
    slot = tl.arange(0, S_PAD)
    exists = slot < num_slots
    blocks = tl.load(INDICES + first + slot, mask=exists, other=0).to(tl.int32)
    read = (tl.load(MASK + first + slot, mask=exists, other=0) != 0) & exists
    if CAUSAL:  # the diagonal covers the own block; later blocks are the future
        read = read & (blocks < t // block_size)
    rank = tl.cumsum(read.to(tl.int32), 0) - 1
    return slot, blocks, read, rank


@triton.jit
def _pick_slot(slot_ids, slot_blocks, read, rank, i):
    """The i-th read slot of `_read_slots`' vectors: (block index, slot)."""
    picked = read & (rank == i)
    return tl.sum(tl.where(picked, slot_blocks, 0), 0), tl.sum(tl.where(picked, slot_ids, 0), 0)


@triton.jit
def _softmax_step(q, k, v, key_ok, logit_scale, m, total, acc, PRECISION: tl.constexpr):
    """One key block of an online softmax: rows q (R, D) against k, v (BLOCK_K, D).

    Logits are in log2 units (logit_scale holds log2 e); m is the running max, total the
    running sum and acc the running numerator; rows that saw nothing keep m = -inf.
    """
    s = _dot(q, tl.trans(k), PRECISION) * logit_scale  # (R, BLOCK_K)
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
    n, num_kv_heads, num_slots, block_size, qk_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): out and log2-sum-exp of heads h*G .. h*G+G-1."""
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_kv_heads, bh % num_kv_heads
    heads = h * G + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < G
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q_ptrs = b * stride_qb + heads[:, None] * stride_qh + t * stride_qn + dims[None, :]
    q = tl.load(Q + q_ptrs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # (G, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    in_block = tl.arange(0, BLOCK_K)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    slots = (bh * n + t) * num_slots
    slot_ids, slot_blocks, read, rank = _read_slots(INDICES, MASK, slots, t, num_slots,
                                                    block_size, S_PAD, CAUSAL)
    for i in range(tl.sum(read.to(tl.int32), 0)):
        block, slot = _pick_slot(slot_ids, slot_blocks, read, rank, i)
        keys = block * block_size + in_block
        key_ok = (in_block < block_size) & (keys < n)
        k = _load_block(k_base, stride_kn, keys, key_ok, dims, dim_ok)
        v = _load_block(v_base, stride_kn, keys, key_ok, dims, dim_ok)
        scale = qk_scale
        if HAS_GATES:
            scale = qk_scale * tl.load(GATES + slots + slot).to(tl.float32)
        m, total, acc = _softmax_step(q, k, v, key_ok, scale, m, total, acc, PRECISION)
    if CAUSAL:  # the block-causal diagonal: the own block up to the token itself
        keys = t // block_size * block_size + in_block
        key_ok = (in_block < block_size) & (keys <= t)
        k = _load_block(k_base, stride_kn, keys, key_ok, dims, dim_ok)
        v = _load_block(v_base, stride_kn, keys, key_ok, dims, dim_ok)
        m, total, acc = _softmax_step(q, k, v, key_ok, qk_scale, m, total, acc, PRECISION)

    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("inf"))
    tl.store(OUT + q_ptrs, out.to(OUT.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
    lse_ptrs = LSE + (b * num_kv_heads * G + heads) * n + t
    tl.store(lse_ptrs, lse, mask=head_ok)


@triton.jit
def _gradient_step(q, do, lse, delta, k, v, key_ok, logit_scale, PRECISION: tl.constexpr):
    """Rows (R, D) against one key block: dL/dlogit ds (R, BLOCK_K) and the raw dot
    products qk (the gates' gradient needs them)."""
    qk = _dot(q, tl.trans(k), PRECISION)
    p = tl.exp2(qk * logit_scale - lse[:, None])
    p = tl.where(key_ok[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return ds, qk


@triton.jit
def _backward_dq_kernel(
    Q, K, V, OUT, DO, LSE, INDICES, MASK, GATES, DQ, DGATES, DELTA,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    n, num_kv_heads, num_slots, block_size, sm_scale,
    G: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATES: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (token t, batch b * kv head h): dq of the group's heads and, with gates,
    d gate for each of the token's slots (summed over the group's heads); also stores
    delta = rowsum(dO * O) for the dk, dv kernel."""
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_kv_heads, bh % num_kv_heads
    heads = h * G + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < G
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    rows_ok = head_ok[:, None] & dim_ok[None, :]
    q_ptrs = b * stride_qb + heads[:, None] * stride_qh + t * stride_qn + dims[None, :]
    q = tl.load(Q + q_ptrs, mask=rows_ok, other=0.0)
    do = tl.load(DO + q_ptrs, mask=rows_ok, other=0.0)
    out = tl.load(OUT + q_ptrs, mask=rows_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)  # softmax backward's rowsum(dO * O)
    row_ptrs = (b * num_kv_heads * G + heads) * n + t
    tl.store(DELTA + row_ptrs, delta, mask=head_ok)  # for the dk, dv kernel
    lse = tl.load(LSE + row_ptrs, mask=head_ok, other=float("inf"))
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    in_block = tl.arange(0, BLOCK_K)
    log2_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    slots = (bh * n + t) * num_slots
    slot_ids, slot_blocks, read, rank = _read_slots(INDICES, MASK, slots, t, num_slots,
                                                    block_size, S_PAD, CAUSAL)
    for i in range(tl.sum(read.to(tl.int32), 0)):  # a slot not read keeps gate gradient 0
        block, slot = _pick_slot(slot_ids, slot_blocks, read, rank, i)
        keys = block * block_size + in_block
        key_ok = (in_block < block_size) & (keys < n)
        k = _load_block(k_base, stride_kn, keys, key_ok, dims, dim_ok)
        v = _load_block(v_base, stride_kn, keys, key_ok, dims, dim_ok)
        gate = 1.0
        if HAS_GATES:
            gate = tl.load(GATES + slots + slot).to(tl.float32)
        ds, qk = _gradient_step(q, do, lse, delta, k, v, key_ok, log2_scale * gate, PRECISION)
        dq += _dot((ds * gate).to(k.dtype), k, PRECISION)
        if HAS_GATES:
            tl.store(DGATES + slots + slot, tl.sum(tl.sum(ds * qk, 1), 0) * sm_scale)
    if CAUSAL:
        keys = t // block_size * block_size + in_block
        key_ok = (in_block < block_size) & (keys <= t)
        k = _load_block(k_base, stride_kn, keys, key_ok, dims, dim_ok)
        v = _load_block(v_base, stride_kn, keys, key_ok, dims, dim_ok)
        ds, _ = _gradient_step(q, do, lse, delta, k, v, key_ok, log2_scale, PRECISION)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows_ok)


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
    n, num_kv_heads, num_slots, num_blocks, block_size, sm_scale,
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
    in_block = tl.arange(0, BLOCK_K)
    keys = j * block_size + in_block
    key_ok = (in_block < block_size) & (keys < n)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    k = _load_block(k_base, stride_kn, keys, key_ok, dims, dim_ok)
    v = _load_block(v_base, stride_kn, keys, key_ok, dims, dim_ok)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    log2_scale = sm_scale * 1.4426950408889634

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

    out = (keys[:, None].to(tl.int64) * stride_kn + dims[None, :]) + b * stride_kb + h * stride_kh
    store_ok = key_ok[:, None] & dim_ok[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=store_ok)


def visible_blocks(
    block_indices: Tensor, block_mask: Tensor, block_size: int, include_block_causal: bool
) -> Tensor:
    """The blocks each query reads, (b, h, n, s) int32, NO_BLOCK where it reads none.

    A slot is dropped where block_mask is False and, with the block-causal diagonal,
    where the block is not strictly before the query's own block (the diagonal
    covers the own block; later blocks are the future).
    """
    keep = block_mask
    if include_block_causal:
        own = torch.arange(block_indices.shape[-2], device=block_indices.device) // block_size
        keep = keep & (block_indices < own[:, None])
    return torch.where(keep, block_indices, NO_BLOCK).to(torch.int32)


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


def _launch_settings(kind: str, dim: int) -> dict[str, int]:
    """num_warps and num_stages of a kernel; heads over 128 wide get one stage (shared memory)."""
    settings = dict(LAUNCH[kind])
    if dim > 128:
        settings["num_stages"] = 1
    return settings


def _forward(q, k, v, indices, mask, gates, block_size, causal, scale):
    """out (b, hq, n, d) and each row's log-sum-exp (b, hq, n), in log2 units, for backward."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
    _forward_kernel[(n, b * hk)](
        q, k, v, indices, mask, q if gates is None else gates, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, indices.shape[-1], block_size, scale * LOG2_E,
        G=hq // hk, D=d, S_PAD=_slots_padded(indices), **_tile_sizes(block_size, hq // hk, d),
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        **_launch_settings("forward", d),
    )
    return out, lse


def _backward_dq(q, k, v, out, do, lse, indices, mask, gates, block_size, causal, scale):
    """dq (b, hq, n, d), d gates (b, hk, n, s) in float32 (with gates) and delta (b, hq, n)."""
    b, hq, n, d = q.shape
    hk = k.shape[1]
    dq = torch.empty_like(q)
    dgates = None if gates is None else torch.zeros_like(gates, dtype=torch.float32)
    delta = torch.empty_like(lse)
    _backward_dq_kernel[(n, b * hk)](
        q, k, v, out, do, lse, indices, mask, q if gates is None else gates, dq,
        q if dgates is None else dgates, delta,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, indices.shape[-1], block_size, scale,
        G=hq // hk, D=d, S_PAD=_slots_padded(indices), **_tile_sizes(block_size, hq // hk, d),
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        **_launch_settings("dq", d),
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
    _backward_dkv_kernel[(num_blocks * b * hk,)](
        q, k, v, do, lse, delta, entries, offsets, q if gates is None else gates, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n, hk, blocks.shape[-1], num_blocks, block_size, scale,
        G=hq // hk, D=d, ROWS=max(DKV_ROWS, tiles["BLOCK_G"]), **tiles,
        HAS_GATES=gates is not None, CAUSAL=causal, PRECISION=_precision(q.dtype),
        **_launch_settings("dkv", d),
    )
    return dk, dv


def _backward(do, q, k, v, out, lse, indices, mask, gates, block_size, causal, scale):
    """All four gradients: dq (and d gates) by token, dk and dv by key block."""
    dq, dgates, delta = _backward_dq(
        q, k, v, out, do, lse, indices, mask, gates, block_size, causal, scale
    )
    blocks = visible_blocks(indices, mask.view(torch.bool), block_size, causal)
    index = invert_selection(blocks, math.ceil(q.shape[-2] / block_size))
    dk, dv = _backward_dkv(
        q, k, v, do, lse, delta, blocks, gates, block_size, causal, scale, index
    )
    return dq, dk, dv, dgates


class SelectionAttention(torch.autograd.Function):
    """The Triton forward and backward as one autograd step; mask is block_mask as uint8."""

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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    block_mask: Tensor,
    block_size: int,
    *,
    sel_scale: Tensor | None = None,
    include_block_causal: bool = True,
    scale: float | None = None,
    check_indices: bool = True,
) -> Tensor:
    """Selected-block attention in Triton: q (b, hq, n, d), k and v (b, hk, n, d) -> (b, hq, n, d).

    block_indices (long) and block_mask (bool), (b, hk, n, s) for selection shared by a
    GQA group or (b, hq, n, s) for one selection per query head: query t attends to the
    keys of its selected blocks (where block_mask) and, with include_block_causal, to
    its own block up to itself (then only blocks before its own count). sel_scale, of
    the same shape, multiplies the logits of each selected block (the diff-topk gates).
    Differentiable in q, k, v and sel_scale. A query that sees no key gets zeros.
    check_indices=False skips the range check of the selected indices, which waits for
    the GPU (top-k indices are in range by construction).
    """
    _check_inputs(q, k, v, block_indices, block_mask, block_size, sel_scale, check_indices)
    require_runnable_kernels()
    hq, hk, selection_heads = q.shape[1], k.shape[1], block_indices.shape[1]
    if selection_heads != hk:  # one selection per query head: each head is its own group
        k, v = (repeat(t, "b h n d -> b (h g) n d", g=hq // hk) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.contiguous() for t in (q, k, v))
    indices, mask = block_indices.contiguous(), block_mask.contiguous().view(torch.uint8)
    gates = None if sel_scale is None else sel_scale.contiguous()
    return SelectionAttention.apply(
        q, k, v, indices, mask, gates, block_size, include_block_causal, scale
    )


def _check_inputs(q, k, v, block_indices, block_mask, block_size, sel_scale, check_indices):
    """Clear errors for every rule the kernels rely on."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (b, h, n, d), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    b, hq, n, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, d):
        raise ValueError(f"k must be (b, hk, n, d) = ({b}, hk, {n}, {d}) like q, "
                         f"got {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if hq % k.shape[1]:
        raise ValueError(f"the query heads must be a multiple of the kv heads, got "
                         f"hq={hq}, hk={k.shape[1]}")
    if not 16 <= d <= 256:
        raise ValueError(f"the head dimension must be between 16 and 256, got d={d}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if block_indices.dim() != 4 or block_indices.shape[1] not in (k.shape[1], hq) or (
        block_indices.shape[0], block_indices.shape[2]) != (b, n):
        raise ValueError(
            f"block_indices must be (b, hk, n, s) or (b, hq, n, s) = ({b}, {k.shape[1]} or "
            f"{hq}, {n}, s), got {tuple(block_indices.shape)}"
        )
    if block_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"block_indices must be int64 (or int32), got {block_indices.dtype}")
    if block_mask.shape != block_indices.shape or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be a bool tensor of block_indices' shape "
            f"{tuple(block_indices.shape)}, got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if sel_scale is not None and (
        sel_scale.shape != block_indices.shape or not sel_scale.is_floating_point()
    ):
        raise ValueError(
            f"sel_scale must be a float tensor of block_indices' shape "
            f"{tuple(block_indices.shape)}, got {sel_scale.dtype} {tuple(sel_scale.shape)}"
        )
    devices = {t.device for t in (q, k, v, block_indices, block_mask)}
    if len(devices) > 1 or (sel_scale is not None and sel_scale.device not in devices):
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if check_indices:
        _check_index_range(block_indices, block_mask, n, block_size)
    if triton_mode() == "compiled" and q.device.type != "cuda":
        raise ValueError(
            f"with a GPU, Triton compiles the kernels for it: move the tensors to the GPU "
            f"(they are on {q.device})"
        )


def _check_index_range(block_indices: Tensor, block_mask: Tensor, n: int, block_size: int) -> None:
    """Every selected index names a block of the sequence (this waits for the GPU)."""
    num_blocks = math.ceil(n / block_size)
    outside = block_mask & ((block_indices < 0) | (block_indices >= num_blocks))
    if outside.any():  # a small reduction, then a wait for the GPU: reading past k is worse
        raise ValueError(
            f"selected block_indices must lie in [0, {num_blocks}) (ceil(n / block_size) with "
            f"n={n}, block_size={block_size}), got {int(block_indices[outside][0])}"
        )
