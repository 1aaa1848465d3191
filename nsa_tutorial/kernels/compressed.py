"""Stage 10: the compressed branch as Triton kernels (paper §3.3.1 Eq. 7-8, Kernel Design §3.4).

Query t attends to the m memory tokens and to the compressed tokens of the blocks that
ended before it (`nsa_tutorial.compress.compressed_causal_mask`): compressed token j is
visible iff (j + 1) * stride - 1 < t, that is j < t // stride. Memory first, then the
compressed tokens, so each query sees a prefix of ck, cv: keys [0, m + t // stride).
That makes this FlashAttention (online softmax, nothing of size n x w in memory) with
a key limit per row instead of the diagonal.

Rows: a kernel works on the (token, group head) pairs of one kv head h, token-major:
row r = t * G + g is query head h * G + g at token t. A tile of BLOCK_M consecutive rows
holds BLOCK_M / G tokens with all G heads of their group, so each tile of compressed
keys is loaded once for the whole GQA group (the paper's group-centric layout), and the
tile's tokens are neighbours whose key limits differ by a key or two.

Forward: program (row tile, batch * kv head) walks the key tiles up to what the tile's
last token sees; only tiles past what its first token sees need the mask. It stores the
output and each row's log-sum-exp (log2 units) for the backward.

Backward (FlashAttention-2's split, notebook 10):
- dq: the forward's walk again (`_key_span`); it also stores delta = rowsum(dO * O);
- dk, dv: program (key tile, chunk of rows, batch * kv head) walks the rows that see the
  tile, from the first reader of its first key on, all G heads of the group. Memory keys
  are seen by all n * G rows, so long walks are cut into chunks of rows (Launch's
  rows_per_program, chunks), one program each, that add their sums into float32 dk, dv
  with atomics (so float32 sums may differ in the last bits from run to run).

The semantics are `compressed_attention` of `nsa_tutorial.compress` (its output, not its
logits): every query sees at least the first memory token, so no row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa_tutorial.kernels import (
    check_attention_tensors,
    require_kernel_device,
    require_runnable_kernels,
)
from nsa_tutorial.kernels.selection import LOG2_E, _dot, _precision
from nsa_tutorial.validation import require_bool, require_number, require_positive_int

Kernel = Literal["forward", "dq", "dkv"]
Settings = TypeVar("Settings")  # a kernel module's Launch dataclass


@dataclass(frozen=True)
class Launch:
    """How one kernel is tiled and launched."""

    block_m: int  # rows (token, group head) per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # software pipelining: the next tile loads while this one is computed
    # dk, dv kernel only: the rows that see a key tile (all n * G for memory keys) are cut
    # into at most `chunks` pieces of at least `rows_per_program` rows, one program each:
    # many pieces fill the GPU at short lengths, few keep the atomics cheap at long ones.
    rows_per_program: int = 0
    chunks: int = 1


# bfloat16 / float16 heads up to 128 wide; chosen on an H200 with
# `benchmarks/compressed_kernel_gpu.py --sweep` (its JSON keeps every variant's time).
# At n = 16k, 64 query and 4 kv heads, d = 128: forward 0.83 ms, dq 1.09, dk and dv 1.87;
# Triton's fused-attention tutorial's Hopper tiles took 0.85, 1.52 and 6.21.
LAUNCH: dict[Kernel, Launch] = {
    "forward": Launch(block_m=64, block_n=64, num_warps=4, num_stages=3),
    "dq": Launch(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "dkv": Launch(block_m=64, block_n=128, num_warps=8, num_stages=3, rows_per_program=4096,
                  chunks=64),
}


def launch_settings(kernel: Kernel, dim: int, dtype: torch.dtype) -> Launch:
    """`kernel`'s LAUNCH entry, fitted to rows `dim` wide (`fit_wide_rows`)."""
    return fit_wide_rows(LAUNCH[kernel], dim, dtype)


def fit_wide_rows(launch: Settings, dim: int, dtype: torch.dtype) -> Settings:
    """`launch` (any settings with block_m, block_n, num_stages); where a head row is over
    256 bytes (half precision over 128 wide, float32 over 64), tiles of at most 32 x 32
    and one stage, so that they fit in shared memory (not tuned: those cases are for
    checking, not speed)."""
    if dim * dtype.itemsize <= 256:
        return launch
    return replace(launch, block_m=min(32, launch.block_m), block_n=min(32, launch.block_n),
                   num_stages=1)


@triton.jit
def _visible_keys(tokens, num_memory, num_keys, stride, CAUSAL: tl.constexpr):
    """How many keys each token sees: the prefix [0, limit) of memory + compressed keys.
    Causal: all m memory keys, and compressed key j iff j < t // stride."""
    if CAUSAL:
        return tl.minimum(num_memory + tokens // stride, num_keys)
    else:
        return tokens * 0 + num_keys


@triton.jit
def _first_reader(key, num_memory, stride, CAUSAL: tl.constexpr):
    """The first token that sees `key` (the inverse of `_visible_keys`): token 0 for a
    memory key, (j + 1) * stride for compressed key j, the token after its block."""
    if CAUSAL:
        return tl.maximum(key - num_memory + 1, 0) * stride
    else:
        return key * 0


@triton.jit
def _rows(start, bh, n, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows start .. start + BLOCK_M - 1 of kv head bh's list of (token, group head) pairs:
    their tokens (BLOCK_M,), which rows exist, and each row's index in a (b, hq, n) tensor
    (lse, delta), which is also its row of a contiguous (b, hq, n, d) tensor (out, dO,
    dq; q need not be contiguous: `_query_offsets`).
    bh = b * hk + h, so query head h * G + g of batch b is head bh * G + g of all b * hq."""
    rows = start + tl.arange(0, BLOCK_M)
    tokens = rows // G
    index = (bh * G + rows % G) * n + tokens
    return tokens, rows < n * G, index


@triton.jit
def _query_offsets(start, bh, num_kv_heads, sq_b, sq_h, sq_n, G: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """Where rows start .. start + BLOCK_M - 1 of kv head bh begin in q, a (b, hq, n, d)
    tensor with strides (sq_b, sq_h, sq_n, 1): the layer's q is a slice of the qkv
    projection, read in place rather than copied."""
    rows = start + tl.arange(0, BLOCK_M)
    b, h = bh // num_kv_heads, bh % num_kv_heads
    return b * sq_b + (h * G + rows % G) * sq_h + (rows // G).to(tl.int64) * sq_n


@triton.jit
def _load_tile(PTR, offsets, ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows that begin at `offsets` (R,) as an (R, BLOCK_D) tile, zero where not ok
    and in the padding past D."""
    dims = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (dims < D)[None, :]
    return tl.load(PTR + offsets[:, None] + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows(PTR, index, ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `index` (R,) of a contiguous (rows, D) tensor as an (R, BLOCK_D) tile, zero
    where not ok and in the padding past D."""
    return _load_tile(PTR, index * D, ok, D, BLOCK_D)


@triton.jit
def _key_span(start, n, num_memory, num_keys, stride, G: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """The keys of row tile `start` for the forward and dq kernels: every row of the tile
    sees keys [0, unmasked_end), whole key tiles that need no mask; some rows see keys
    [unmasked_end, end), the tiles to walk with the mask."""
    first = start // G
    last = (tl.minimum(start + BLOCK_M, n * G) - 1) // G
    seen_by_all = _visible_keys(first, num_memory, num_keys, stride, CAUSAL)
    unmasked_end = seen_by_all // BLOCK_N * BLOCK_N
    return unmasked_end, _visible_keys(last, num_memory, num_keys, stride, CAUSAL)


@triton.jit
def _forward_keys(q, acc, m_i, l_i, K_HEAD, V_HEAD, lo, hi, limit, num_keys, log2_scale,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Key tiles lo .. hi of an online softmax (the fused-attention tutorial's inner loop):
    rows q (R, D) against keys (BLOCK_N, D) of K_HEAD, V_HEAD; logits in log2 units.
    m_i is the running max, l_i the running sum, acc the running numerator. MASKED hides
    keys at or past each row's limit (R,)."""
    for key_start in range(lo, hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_HEAD, keys, keys < num_keys, D, BLOCK_D)
        v = _load_rows(V_HEAD, keys, keys < num_keys, D, BLOCK_D)
        s = _dot(q, tl.trans(k), PRECISION) * log2_scale  # (R, BLOCK_N)
        if MASKED:
            s = tl.where(keys[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0, a memory key, came first
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _compressed_forward_kernel(
    Q, K, V, OUT, LSE, sq_b, sq_h, sq_n, n, num_kv_heads, num_memory, num_keys, stride,
    log2_scale, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (row tile, batch * kv head), last tiles (the longest walks) first: out and
    log2-sum-exp of BLOCK_M rows (token, group head)."""
    start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
    q_rows = _query_offsets(start, bh, num_kv_heads, sq_b, sq_h, sq_n, G, BLOCK_M)
    q = _load_tile(Q, q_rows, row_ok, D, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    limit = _visible_keys(tokens, num_memory, num_keys, stride, CAUSAL)
    unmasked_end, end = _key_span(start, n, num_memory, num_keys, stride, G, BLOCK_M,
                                  BLOCK_N, CAUSAL)
    K_HEAD, V_HEAD = K + bh * num_keys * D, V + bh * num_keys * D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _forward_keys(q, acc, m_i, l_i, K_HEAD, V_HEAD, 0, unmasked_end, limit,
                                  num_keys, log2_scale, D, BLOCK_N, BLOCK_D, False, PRECISION)
    acc, m_i, l_i = _forward_keys(q, acc, m_i, l_i, K_HEAD, V_HEAD, unmasked_end, end, limit,
                                  num_keys, log2_scale, D, BLOCK_N, BLOCK_D, True, PRECISION)

    dims = tl.arange(0, BLOCK_D)
    out_ok = row_ok[:, None] & (dims < D)[None, :]
    out = acc / l_i[:, None]
    tl.store(OUT + rows[:, None] * D + dims[None, :], out.to(OUT.dtype.element_ty), mask=out_ok)
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _dq_keys(q, do, lse, delta, dq, K_HEAD, V_HEAD, lo, hi, limit, num_keys, log2_scale,
             D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Key tiles lo .. hi of the dq walk: rows q, dO (R, D) recompute their attention p
    from lse, then dL/dlogit ds = p * (dO v - delta) and dq += ds k."""
    for key_start in range(lo, hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_HEAD, keys, keys < num_keys, D, BLOCK_D)
        v = _load_rows(V_HEAD, keys, keys < num_keys, D, BLOCK_D)
        p = tl.exp2(_dot(q, tl.trans(k), PRECISION) * log2_scale - lse[:, None])
        if MASKED:
            p = tl.where(keys[None, :] < limit[:, None], p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)  # (R, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _compressed_backward_dq_kernel(
    Q, K, V, OUT, DO, LSE, DQ, DELTA, sq_b, sq_h, sq_n, n, num_kv_heads, num_memory, num_keys,
    stride, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (row tile, batch * kv head), as the forward: dq of BLOCK_M rows; also stores
    their delta = rowsum(dO * O) for the dk, dv kernel."""
    start = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
    q_rows = _query_offsets(start, bh, num_kv_heads, sq_b, sq_h, sq_n, G, BLOCK_M)
    q = _load_tile(Q, q_rows, row_ok, D, BLOCK_D)
    do = _load_rows(DO, rows, row_ok, D, BLOCK_D)
    out = _load_rows(OUT, rows, row_ok, D, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)  # softmax backward's rowsum
    tl.store(DELTA + rows, delta, mask=row_ok)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))  # no row: p = 0
    limit = _visible_keys(tokens, num_memory, num_keys, stride, CAUSAL)
    unmasked_end, end = _key_span(start, n, num_memory, num_keys, stride, G, BLOCK_M,
                                  BLOCK_N, CAUSAL)
    K_HEAD, V_HEAD = K + bh * num_keys * D, V + bh * num_keys * D

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_keys(q, do, lse, delta, dq, K_HEAD, V_HEAD, 0, unmasked_end, limit, num_keys,
                  log2_scale, D, BLOCK_N, BLOCK_D, False, PRECISION)
    dq = _dq_keys(q, do, lse, delta, dq, K_HEAD, V_HEAD, unmasked_end, end, limit, num_keys,
                  log2_scale, D, BLOCK_N, BLOCK_D, True, PRECISION)

    dims = tl.arange(0, BLOCK_D)
    dq_ok = row_ok[:, None] & (dims < D)[None, :]
    tl.store(DQ + rows[:, None] * D + dims[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=dq_ok)


@triton.jit
def _dkv_rows(k, v, dk, dv, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, bh, keys, lo, hi, n,
              num_kv_heads, num_memory, num_keys, stride, log2_scale, G: tl.constexpr,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Row tiles lo .. hi of the dk, dv walk, keys k, v (BLOCK_N, D) against rows q, dO
    (BLOCK_M, D), transposed (keys first, as Triton's fused-attention tutorial) so that
    dv += p^T dO and dk += ds^T q need no transpose of a computed tile. MASKED hides the
    keys a row does not see yet."""
    for start in range(lo, hi, BLOCK_M):
        tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
        q_rows = _query_offsets(start, bh, num_kv_heads, sq_b, sq_h, sq_n, G, BLOCK_M)
        q = _load_tile(Q, q_rows, row_ok, D, BLOCK_D)
        do = _load_rows(DO, rows, row_ok, D, BLOCK_D)
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))  # no row: p = 0
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        p_t = tl.exp2(_dot(k, tl.trans(q), PRECISION) * log2_scale - lse[None, :])
        if MASKED:
            limit = _visible_keys(tokens, num_memory, num_keys, stride, CAUSAL)
            p_t = tl.where(keys[:, None] < limit[None, :], p_t, 0.0)  # (BLOCK_N, BLOCK_M)
        dv += _dot(p_t.to(do.dtype), do, PRECISION)
        dp_t = _dot(v, tl.trans(do), PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _compressed_backward_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_n, n, num_kv_heads, num_memory, num_keys,
    stride, rows_per_program, sm_scale, log2_scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (key tile, chunk c, batch * kv head): dk, dv of BLOCK_N keys from the c-th
    chunk of rows_per_program rows (whole row tiles) among those that see the tile, added
    into DK, DV."""
    key_start = tl.program_id(0) * BLOCK_N
    chunk = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    keys = key_start + tl.arange(0, BLOCK_N)
    key_ok = keys < num_keys
    k = _load_rows(K + bh * num_keys * D, keys, key_ok, D, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + bh * num_keys * D, keys, key_ok, D, BLOCK_D)

    # Rows from the first reader of the first key on see some keys of the tile; from the
    # first reader of the last key on, all of them. Row tiles start at multiples of
    # BLOCK_M, so that no row falls in two tiles.
    last_key = tl.minimum(key_start + BLOCK_N, num_keys) - 1
    first_row = tl.minimum(_first_reader(key_start, num_memory, stride, CAUSAL), n) * G
    sees_all = tl.minimum(_first_reader(last_key, num_memory, stride, CAUSAL), n) * G
    sees_all = tl.cdiv(sees_all, BLOCK_M) * BLOCK_M
    lo = first_row // BLOCK_M * BLOCK_M + chunk * rows_per_program
    hi = tl.minimum(lo + rows_per_program, n * G)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkv_rows(k, v, dk, dv, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, bh, keys, lo,
                       tl.minimum(hi, sees_all), n, num_kv_heads, num_memory, num_keys, stride,
                       log2_scale, G, D, BLOCK_M, BLOCK_D, CAUSAL, True, PRECISION)
    dk, dv = _dkv_rows(k, v, dk, dv, Q, DO, LSE, DELTA, sq_b, sq_h, sq_n, bh, keys,
                       tl.maximum(lo, sees_all), hi, n, num_kv_heads, num_memory, num_keys,
                       stride, log2_scale, G, D, BLOCK_M, BLOCK_D, CAUSAL, False, PRECISION)

    dims = tl.arange(0, BLOCK_D)
    offsets = (bh * num_keys + keys)[:, None] * D + dims[None, :]
    ok = key_ok[:, None] & (dims < D)[None, :] & (lo < hi)  # an empty chunk adds nothing
    tl.atomic_add(DK + offsets, dk * sm_scale, mask=ok)
    tl.atomic_add(DV + offsets, dv, mask=ok)


def _block_d(dim: int) -> int:
    """The head, padded to a power of two (at least 16, for tl.dot)."""
    return max(16, triton.next_power_of_2(dim))


def _row_tiles(kernel: Kernel, q: Tensor, ck: Tensor, causal: bool) -> tuple[tuple, dict]:
    """The grid (row tiles, batch * kv heads) of the forward or dq kernel, and the
    compile-time settings both take."""
    b, hq, n, d = q.shape
    launch = launch_settings(kernel, d, q.dtype)
    grid = (triton.cdiv(n * (hq // ck.shape[1]), launch.block_m), b * ck.shape[1])
    settings = dict(
        G=hq // ck.shape[1], D=d, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D=_block_d(d), CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip
    return grid, settings


def _forward(q, ck, cv, num_memory, stride, causal, scale):
    """out (b, hq, n, d) and each row's log-sum-exp (b, hq, n), in log2 units, for backward."""
    grid, settings = _row_tiles("forward", q, ck, causal)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    _compressed_forward_kernel[grid](
        q, ck, cv, out, lse, *q.stride()[:3], q.shape[2], ck.shape[1], num_memory, ck.shape[2],
        stride, scale * LOG2_E, **settings,
    )  # fmt: skip
    return out, lse


def _backward_dq(do, q, ck, cv, out, lse, num_memory, stride, causal, scale):
    """dq (b, hq, n, d) and delta = rowsum(dO * O) (b, hq, n), float32."""
    grid, settings = _row_tiles("dq", q, ck, causal)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty_like(lse)
    _compressed_backward_dq_kernel[grid](
        q, ck, cv, out, do, lse, dq, delta, *q.stride()[:3], q.shape[2], ck.shape[1],
        num_memory, ck.shape[2], stride, scale, scale * LOG2_E, **settings,
    )  # fmt: skip
    return dq, delta


def _backward_dkv(do, q, ck, cv, lse, delta, num_memory, stride, causal, scale):
    """dk, dv (b, hk, m + w, d), summed in float32 over chunks of rows, then cast to ck's dtype."""
    b, hq, n, d = q.shape
    hk, num_keys = ck.shape[1], ck.shape[2]
    group = hq // hk
    launch = launch_settings("dkv", d, q.dtype)
    rows = n * group
    chunk = max(launch.rows_per_program, triton.cdiv(rows, launch.chunks))
    chunk = triton.cdiv(chunk, launch.block_m) * launch.block_m  # whole row tiles
    dk = torch.zeros(ck.shape, dtype=torch.float32, device=ck.device)
    dv = torch.zeros_like(dk)
    key_tiles = (triton.cdiv(num_keys, launch.block_n), triton.cdiv(rows, chunk), b * hk)
    _compressed_backward_dkv_kernel[key_tiles](
        q, ck, cv, do, lse, delta, dk, dv, *q.stride()[:3], n, hk, num_memory, num_keys,
        stride, chunk, scale, scale * LOG2_E,
        G=group, D=d, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=_block_d(d),
        CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dk.to(ck.dtype), dv.to(cv.dtype)


class CompressedAttention(torch.autograd.Function):
    """The Triton forward and backward as one autograd step: gradients for q, ck and cv
    (through ck, cv they reach the compression MLPs and the memory tokens)."""

    @staticmethod
    def forward(ctx, q, ck, cv, num_memory, stride, causal, scale):
        out, lse = _forward(q, ck, cv, num_memory, stride, causal, scale)
        ctx.save_for_backward(q, ck, cv, out, lse)
        ctx.settings = (num_memory, stride, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, ck, cv, out, lse = ctx.saved_tensors
        do = do.contiguous()
        dq, delta = _backward_dq(do, q, ck, cv, out, lse, *ctx.settings)
        dk, dv = _backward_dkv(do, q, ck, cv, lse, delta, *ctx.settings)
        return dq, dk, dv, None, None, None, None


def compressed_attention(
    q: Tensor, ck: Tensor, cv: Tensor, *, num_memory: int, stride: int, causal: bool,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Compressed attention in Triton: q (b, hq, n, d) over memory + compressed keys and
    values ck, cv (b, hk, m + w, d) -> out (b, hq, n, d).

    The output of `nsa_tutorial.compress.compressed_attention` (not its logits: the
    importance scores are computed elsewhere), without any (n, w) tensor. Query head
    h * G + g reads kv head h (einops '(h g)'). Differentiable in q, ck and cv.

    Args:
        num_memory: m, the learned memory tokens in front of the compressed ones; at
            least 1 (SparseAttention always has one): with none, a causal query before the
            end of the first block would see no key at all.
        stride: tokens between the ends of consecutive compressed blocks.
        causal: query t sees the memory and compressed token j iff (j + 1) * stride - 1 < t;
            otherwise every query sees every key.
        scale: the softmax scale, d ** -0.5 by default.
    """
    _check_inputs(q, ck, cv, num_memory, stride, causal, scale)
    require_runnable_kernels()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q = q if q.stride(-1) == 1 else q.contiguous()  # any other strides are read in place
    ck, cv = ck.contiguous(), cv.contiguous()
    return CompressedAttention.apply(q, ck, cv, num_memory, stride, causal, scale)


def _check_inputs(q, ck, cv, num_memory, stride, causal, scale):
    """Clear errors for every rule the kernels rely on, before anything launches."""
    check_attention_tensors(q, ck, cv, ("ck", "cv"), ("b", "hk", "m + w", "d"))
    require_positive_int("stride", stride)
    if isinstance(num_memory, bool) or not isinstance(num_memory, int):
        raise TypeError(f"num_memory must be an int, got num_memory={num_memory!r}")
    if not 1 <= num_memory <= ck.shape[2]:
        raise ValueError(
            f"num_memory must be between 1 and the keys' length m + w={ck.shape[2]} (every "
            f"query sees the memory; with none, an early causal query would see no key), got "
            f"num_memory={num_memory}"
        )
    require_bool("causal", causal)
    require_number("scale", scale, allow_none=True)
    require_kernel_device(q=q, ck=ck, cv=cv)
