"""Stage 10: the sliding window as Triton kernels, forward and backward.

Token t attends to keys t - w .. t, causal, or t - w .. t + w
(`nsa_tutorial.sliding.sliding_window_mask`). Not causal, the keys past the end of a
sequence that is no multiple of w are zeros that the last queries still see, as in
`sliding_window_attention` and the reference; here they are masked loads past n, which
read as zero, not a padded copy of k and v.

The rows are the compressed kernels' (`nsa_tutorial.kernels.compressed`): row
r = t * G + g is query head h * G + g at token t, so a tile of BLOCK_M rows holds
BLOCK_M / G tokens with all G heads of their group, and each tile of keys is loaded once
for the whole GQA group. Flex attention (`nsa_tutorial.sliding.sliding_window_attention_gpu`)
runs every query head on its own and rounds the window out to 128 x 128 tiles. On an H200
at 64k tokens these kernels are 1.3x faster than flex attention compiled for dynamic
shapes, the kernel the layer got from its second length on (benchmarks/window_gpu.json),
and about as fast as flex compiled for one length (an earlier run,
benchmarks/sliding_window_gpu.json); they compile once for every length, so the layer
uses them.

- Forward: program (row tile, batch * kv head) walks the key tiles from the window's
  start for its first token to the window's end for its last token, with an online
  softmax.
- dq: the same walk again, from the forward's log-sum-exp.
- dk, dv: program (key tile, batch * kv head) walks the rows that see it, tokens
  k .. k + w (from k - w, not causal); no two programs write the same key, so no
  atomics.

Every tile is masked (the window's two edges and the diagonal), which keeps one loop per
kernel; a key tile with no visible key for some row gives that row p = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa_tutorial.kernels import (
    check_attention_tensors,
    require_kernel_device,
    require_runnable_kernels,
)
from nsa_tutorial.kernels.compressed import _block_d, _load_rows, _rows, fit_wide_rows
from nsa_tutorial.kernels.selection import LOG2_E, _dot, _precision
from nsa_tutorial.validation import require_bool, require_number, require_positive_int


@dataclass(frozen=True)
class Launch:
    """How the three kernels are tiled and launched."""

    block_m: int = 64  # rows (token, group head) per tile
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


# The best forward + backward of window_gpu.py's sweep at 64k (bfloat16, d = 128).
LAUNCH = Launch()


def launch_settings(dim: int, dtype: torch.dtype) -> Launch:
    """LAUNCH, fitted to rows `dim` wide as the compressed kernels' (`fit_wide_rows`)."""
    return fit_wide_rows(LAUNCH, dim, dtype)


@triton.jit
def _visible(tokens, keys, window, num_keys, CAUSAL: tl.constexpr):
    """(R, C) bool: token t sees key j iff t - window <= j <= t (causal) or <= t + window,
    and j < num_keys (n; not causal, n padded to a multiple of the window)."""
    distance = tokens[:, None] - keys[None, :]
    return (distance <= window) & (distance >= (0 if CAUSAL else -window)) & (
        keys[None, :] < num_keys
    )


@triton.jit
def _key_span(first, last, window, num_keys, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Start of the first key tile that tokens first .. last see, and one past their last key."""
    lo = tl.maximum(first - window, 0) // BLOCK_N * BLOCK_N
    hi = last + 1 if CAUSAL else tl.minimum(last + window + 1, num_keys)
    return lo, hi


@triton.jit
def _window_forward_kernel(
    Q, K, V, OUT, LSE, n, num_keys, window, log2_scale,
    CAUSAL: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (row tile, batch * kv head): out and log2-sum-exp of BLOCK_M rows."""
    start = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
    q = _load_rows(Q, rows, row_ok, D, BLOCK_D)
    K_HEAD, V_HEAD = K + bh * n * D, V + bh * n * D
    first, last = start // G, (tl.minimum(start + BLOCK_M, n * G) - 1) // G
    lo, hi = _key_span(first, last, window, num_keys, CAUSAL, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(lo, hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_HEAD, keys, keys < n, D, BLOCK_D)
        v = _load_rows(V_HEAD, keys, keys < n, D, BLOCK_D)
        s = _dot(q, tl.trans(k), PRECISION) * log2_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_visible(tokens, keys, window, num_keys, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    dims = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (dims < D)[None, :]
    tl.store(OUT + rows[:, None] * D + dims[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=ok)  # fmt: skip
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _window_backward_dq_kernel(
    Q, K, V, OUT, DO, LSE, DQ, DELTA, n, num_keys, window, sm_scale, log2_scale,
    CAUSAL: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (row tile, batch * kv head), as the forward: dq of BLOCK_M rows, and their
    delta = rowsum(dO * O) for the dk, dv kernel."""
    start = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
    q = _load_rows(Q, rows, row_ok, D, BLOCK_D)
    do = _load_rows(DO, rows, row_ok, D, BLOCK_D)
    out = _load_rows(OUT, rows, row_ok, D, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * out.to(tl.float32), 1)
    tl.store(DELTA + rows, delta, mask=row_ok)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))  # no row: p = 0
    K_HEAD, V_HEAD = K + bh * n * D, V + bh * n * D
    first, last = start // G, (tl.minimum(start + BLOCK_M, n * G) - 1) // G
    lo, hi = _key_span(first, last, window, num_keys, CAUSAL, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(lo, hi, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(K_HEAD, keys, keys < n, D, BLOCK_D)
        v = _load_rows(V_HEAD, keys, keys < n, D, BLOCK_D)
        p = tl.exp2(_dot(q, tl.trans(k), PRECISION) * log2_scale - lse[:, None])
        p = tl.where(_visible(tokens, keys, window, num_keys, CAUSAL), p, 0.0)
        ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)

    dims = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (dims < D)[None, :]
    tl.store(DQ + rows[:, None] * D + dims[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=ok)  # fmt: skip


@triton.jit
def _window_backward_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, n, num_keys, window, sm_scale, log2_scale,
    CAUSAL: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (key tile, batch * kv head): dk, dv of BLOCK_N keys from the rows that see
    them, tokens key_start (key_start - window, not causal) .. key_start + BLOCK_N - 1 +
    window (transposed, keys first). The zero keys past n have no gradient."""
    key_start = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    keys = key_start + tl.arange(0, BLOCK_N)
    k = _load_rows(K + bh * n * D, keys, keys < n, D, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + bh * n * D, keys, keys < n, D, BLOCK_D)
    lo = (key_start if CAUSAL else tl.maximum(key_start - window, 0)) * G // BLOCK_M * BLOCK_M
    hi = tl.minimum(key_start + BLOCK_N + window, n) * G

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        tokens, row_ok, rows = _rows(start, bh, n, G, BLOCK_M)
        q = _load_rows(Q, rows, row_ok, D, BLOCK_D)
        do = _load_rows(DO, rows, row_ok, D, BLOCK_D)
        lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        p_t = tl.exp2(_dot(k, tl.trans(q), PRECISION) * log2_scale - lse[None, :])
        seen = tl.trans(_visible(tokens, keys, window, num_keys, CAUSAL))  # (BLOCK_N, BLOCK_M)
        p_t = tl.where(seen, p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, PRECISION)
        ds_t = p_t * (_dot(v, tl.trans(do), PRECISION) - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, PRECISION)

    dims = tl.arange(0, BLOCK_D)
    offsets = (bh * n + keys)[:, None] * D + dims[None, :]
    ok = (keys < n)[:, None] & (dims < D)[None, :]
    tl.store(DK + offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=ok)


def _num_keys(n: int, window: int, causal: bool) -> int:
    """How many keys the window rule runs over: n, or not causal n padded with zero keys to
    a multiple of the window (the reference's quirk)."""
    return n if causal else n + (-n % window)


def _grids(q: Tensor, k: Tensor, launch: Launch) -> tuple[tuple[int, int], tuple[int, int]]:
    """(row tiles, batch * kv heads) for the forward and dq kernels, (key tiles, batch * kv
    heads) for the dk, dv kernel."""
    b, hq, n, _ = q.shape
    hk = k.shape[1]
    row_tiles = (triton.cdiv(n * (hq // hk), launch.block_m), b * hk)
    return row_tiles, (triton.cdiv(n, launch.block_n), b * hk)


def _settings(q: Tensor, k: Tensor, causal: bool, launch: Launch) -> dict:
    """The compile-time settings the three kernels share."""
    return dict(
        CAUSAL=causal, G=q.shape[1] // k.shape[1], D=q.shape[-1], BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n, BLOCK_D=_block_d(q.shape[-1]), PRECISION=_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )  # fmt: skip


class WindowAttention(torch.autograd.Function):
    """The Triton forward and backward as one autograd step."""

    @staticmethod
    def forward(ctx, q, k, v, window, causal, scale):
        n = q.shape[2]
        launch = launch_settings(q.shape[-1], q.dtype)
        row_tiles, _ = _grids(q, k, launch)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        _window_forward_kernel[row_tiles](q, k, v, out, lse, n, _num_keys(n, window, causal),
                                          window, scale * LOG2_E,
                                          **_settings(q, k, causal, launch))  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings = (window, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        window, causal, scale = ctx.settings
        do = do.contiguous()
        n = q.shape[2]
        launch = launch_settings(q.shape[-1], q.dtype)
        (row_tiles, key_tiles), settings = _grids(q, k, launch), _settings(q, k, causal, launch)
        num_keys = _num_keys(n, window, causal)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)
        _window_backward_dq_kernel[row_tiles](q, k, v, out, do, lse, dq, delta, n, num_keys,
                                              window, scale, scale * LOG2_E, **settings)
        _window_backward_dkv_kernel[key_tiles](q, k, v, do, lse, delta, dk, dv, n, num_keys,
                                               window, scale, scale * LOG2_E, **settings)
        return dq, dk, dv, None, None, None


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, causal: bool = True,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """Sliding-window attention in Triton: q (b, hq, n, d) over k, v (b, hk, n, d), query
    t seeing keys t - window .. t (causal) or .. t + window -> (b, hq, n, d).

    `nsa_tutorial.sliding.sliding_window_attention(q, k, v, window, causal, scale)`,
    without its (n, 2w) or (n, 3w) chunks of scores. Query head h * G + g reads kv head h
    (einops '(h g)'). Differentiable in q, k and v.
    """
    check_attention_tensors(q, k, v, ("k", "v"), ("b", "hk", "n", "d"))
    require_positive_int("window", window)
    require_bool("causal", causal)
    require_number("scale", scale, allow_none=True)
    require_kernel_device(q=q, k=k, v=v)
    require_runnable_kernels()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (q, k, v))
    return WindowAttention.apply(q, k, v, window, causal, scale)
