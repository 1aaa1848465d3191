"""Stage 10: the layer's glue as small Triton kernels, forward and backward.

Between its big matrix products the layer runs chains of elementwise work: the pre-norm
(`nsa_tutorial.norm.RMSNorm`: a float32 copy, a square, a mean, an rsqrt, two products, a
cast), rotary on q and k (`nsa_tutorial.rotary.apply_rotary`: angles, cos, sin, a pair
swap, a cast, a concatenation) and Eq. 5's gated sum
(`nsa_tutorial.attention.combine_branches`: a stack of the three branches, a product, a
sum, then a transpose for the output projection). Eager PyTorch writes every
intermediate to memory. Each kernel here reads its inputs once and writes its result
once, in the layout the next step wants:

- `rms_norm_triton(x, weight, eps)`: x (..., dim) normed row by row into a contiguous
  (..., dim). Autograd keeps x and one float32 scale per row; the backward is one pass
  too, with the weight's gradient summed per program, then over programs.
- `rotary_triton(x, freqs)`: x (b, h, n, d), any strides, rotated into a contiguous
  (b, h, n, d). Each head's tile is read once and split into its feature pairs in
  registers. Its backward is the same kernel turning the other way.
- `gated_sum_triton(gates, compressed, selected, sliding)`: (b, h, n, 3) gates and three
  (b, h, n, d) branches -> (b, n, h * d), ready for `combine_heads`.

All compute in float32 and round once, as the PyTorch functions do; the GPU path of
`SparseAttention` calls them. Notebook 10 measures what the rotary and gated-sum kernels
save; the RMSNorm pass and the one-load rotary have not been timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nsa_tutorial.kernels import (
    require_kernel_device,
    require_kernel_dtype,
    require_runnable_kernels,
)

BLOCK_T = 32  # tokens per program; one program holds all d features of each token


@triton.jit
def _rotary_kernel(X, OUT, FREQS, H, n, offset, sx_b, sx_h, sx_n, SIGN: tl.constexpr,
                   D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token tile, batch): each pair (even, odd) = (x[2i], x[2i + 1]) of BLOCK_T
    tokens in every head turned by SIGN * (position * freqs[i]):
    even cos - odd sin, odd cos + even sin. The D/2 angles per token are computed once for
    all H heads; each head's (BLOCK_T, D) tile is read once, contiguously, and split into
    its even and odd features in registers (no second, permuted load). OUT is contiguous
    (b, H, n, D); BLOCK_D is D rounded up to a power of two, so BLOCK_D / 2 pairs."""
    b = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    features = tl.arange(0, BLOCK_D)
    pairs = tl.arange(0, BLOCK_D // 2)
    ok = (tokens < n)[:, None] & (features < D)[None, :]
    freqs = tl.load(FREQS + pairs, mask=pairs < D // 2, other=0.0)
    angle = (tokens + offset).to(tl.float32)[:, None] * freqs[None, :]  # (BLOCK_T, BLOCK_D/2)
    cos, sin = tl.cos(angle), SIGN * tl.sin(angle)
    # head 0's tile; 64-bit token offsets (a q view at 256k tokens passes 2^31 elements)
    src = X + b * sx_b + tokens[:, None].to(tl.int64) * sx_n + features[None, :]
    for h in range(H):
        x = tl.load(src, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
        even, odd = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_D // 2, 2)))  # (BLOCK_T, BLOCK_D/2)
        turned = tl.join(even * cos - odd * sin, odd * cos + even * sin)  # (.., BLOCK_D/2, 2)
        dst = OUT + ((b * H + h) * n + tokens[:, None]) * D + features[None, :]
        out = tl.reshape(turned, (BLOCK_T, BLOCK_D)).to(OUT.dtype.element_ty)
        tl.store(dst, out, mask=ok)
        src += sx_h  # the next head


def _rotate(x: Tensor, freqs: Tensor, offset: int, sign: int) -> Tensor:
    """Launch the rotary kernel: x (b, h, n, d) -> contiguous rotated copy."""
    b, h, n, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((b, h, n, d), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, BLOCK_T), b)
    _rotary_kernel[grid](x, out, freqs, h, n, offset, x.stride(0), x.stride(1), x.stride(2),
                         SIGN=sign, D=d, BLOCK_T=BLOCK_T,
                         BLOCK_D=triton.next_power_of_2(d))  # fmt: skip
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, freqs: Tensor, offset: int) -> Tensor:
        ctx.save_for_backward(freqs)
        ctx.offset = offset
        return _rotate(x, freqs, offset, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (freqs,) = ctx.saved_tensors
        return _rotate(grad, freqs, ctx.offset, -1), None, None


def rotary_triton(x: Tensor, freqs: Tensor, offset: int = 0) -> Tensor:
    """`apply_rotary(x, freqs, offset)` in one pass: x (b, h, n, d) -> contiguous
    (b, h, n, d), every feature rotated (d = 2 * len(freqs))."""
    require_runnable_kernels()
    if x.ndim != 4:
        raise ValueError(f"x must have shape (b, h, n, d), got x of shape {tuple(x.shape)}")
    d = x.shape[-1]
    if d != 2 * freqs.shape[-1]:
        raise ValueError(
            f"rotary_triton rotates every feature: x's last axis must equal 2 * len(freqs), "
            f"got d={d}, len(freqs)={freqs.shape[-1]}"
        )
    if x.device != freqs.device:
        raise ValueError(f"x is on {x.device} but freqs on {freqs.device}")
    return _Rotary.apply(x, freqs.float().contiguous(), offset)


@triton.jit
def _branch_tile(PTR, bh, H, tokens, dims, s_b, s_h, s_n, ok):
    """A (BLOCK_T, BLOCK_D) tile of one (b, h, n, d) tensor with strides (s_b, s_h, s_n, 1)."""
    rows = (bh // H) * s_b + (bh % H) * s_h + tokens * s_n
    return tl.load(PTR + rows[:, None] + dims[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _gated_sum_kernel(
    GATES, C, S, W, OUT, H, n, sg_b, sg_h, sg_n, sg_i, sc_b, sc_h, sc_n, ss_b, ss_h, ss_n,
    sw_b, sw_h, sw_n, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token tile, b * h): OUT[b, t, h * D + j] = sum over the three branches of
    gate * branch[b, h, t, j]; OUT is contiguous (b, n, H * D)."""
    bh = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    ok = (tokens < n)[:, None] & (dims < D)[None, :]
    gate = GATES + (bh // H) * sg_b + (bh % H) * sg_h + tokens * sg_n
    g_c = tl.load(gate, mask=tokens < n, other=0.0).to(tl.float32)[:, None]
    g_s = tl.load(gate + sg_i, mask=tokens < n, other=0.0).to(tl.float32)[:, None]
    g_w = tl.load(gate + 2 * sg_i, mask=tokens < n, other=0.0).to(tl.float32)[:, None]
    out = g_c * _branch_tile(C, bh, H, tokens, dims, sc_b, sc_h, sc_n, ok)
    out += g_s * _branch_tile(S, bh, H, tokens, dims, ss_b, ss_h, ss_n, ok)
    out += g_w * _branch_tile(W, bh, H, tokens, dims, sw_b, sw_h, sw_n, ok)
    dst = OUT + ((bh // H) * n + tokens[:, None]) * (H * D) + (bh % H) * D + dims[None, :]
    tl.store(dst, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _branch_backward(BRANCH, D_BRANCH, D_GATE, GATE, d_out, bh, H, n, tokens, dims, s_b, s_h,
                     s_n, ok, D: tl.constexpr):
    """One branch of the backward: d_branch = gate * d_out, stored in a contiguous
    (b, H, n, D), and d_gate = the sum over features of branch * d_out."""
    gate = tl.load(GATE, mask=tokens < n, other=0.0).to(tl.float32)
    branch = _branch_tile(BRANCH, bh, H, tokens, dims, s_b, s_h, s_n, ok)
    dst = D_BRANCH + (bh * n + tokens[:, None]) * D + dims[None, :]
    tl.store(dst, (gate[:, None] * d_out).to(D_BRANCH.dtype.element_ty), mask=ok)
    tl.store(D_GATE, tl.sum(branch * d_out, 1), mask=tokens < n)


@triton.jit
def _gated_sum_backward_kernel(
    D_OUT, GATES, C, S, W, D_GATES, D_C, D_S, D_W, H, n, sg_b, sg_h, sg_n, sg_i,
    sc_b, sc_h, sc_n, ss_b, ss_h, ss_n, sw_b, sw_h, sw_n, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (token tile, b * h): each branch's gradient is its gate times d_out, each
    gate's the dot product of its branch with d_out. D_OUT is contiguous (b, n, H * D);
    D_C, D_S, D_W contiguous (b, H, n, D); D_GATES contiguous (b, H, n, 3) float32."""
    bh = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    ok = (tokens < n)[:, None] & (dims < D)[None, :]
    src = D_OUT + ((bh // H) * n + tokens[:, None]) * (H * D) + (bh % H) * D + dims[None, :]
    d_out = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    gate = GATES + (bh // H) * sg_b + (bh % H) * sg_h + tokens * sg_n
    d_gate = D_GATES + (bh * n + tokens) * 3
    _branch_backward(C, D_C, d_gate, gate, d_out, bh, H, n, tokens, dims, sc_b, sc_h, sc_n,
                     ok, D)
    _branch_backward(S, D_S, d_gate + 1, gate + sg_i, d_out, bh, H, n, tokens, dims, ss_b,
                     ss_h, ss_n, ok, D)
    _branch_backward(W, D_W, d_gate + 2, gate + 2 * sg_i, d_out, bh, H, n, tokens, dims, sw_b,
                     sw_h, sw_n, ok, D)


class _GatedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates: Tensor, *branches: Tensor) -> Tensor:
        ctx.save_for_backward(gates, *branches)
        b, h, n, d = branches[0].shape
        out = torch.empty((b, n, h * d), device=gates.device, dtype=branches[0].dtype)
        _gated_sum_kernel[(triton.cdiv(n, BLOCK_T), b * h)](
            gates, *branches, out, h, n, *gates.stride()[:3], gates.stride(3),
            *(s for t in branches for s in _strides(t)), D=d, BLOCK_T=BLOCK_T,
            BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, ...]:
        gates, *branches = ctx.saved_tensors
        b, h, n, d = branches[0].shape
        d_gates = torch.empty((b, h, n, 3), device=gates.device, dtype=torch.float32)
        d_branches = [torch.empty((b, h, n, d), device=t.device, dtype=t.dtype) for t in branches]
        _gated_sum_backward_kernel[(triton.cdiv(n, BLOCK_T), b * h)](
            d_out.contiguous(), gates, *branches, d_gates, *d_branches, h, n,
            *gates.stride()[:3], gates.stride(3), *(s for t in branches for s in _strides(t)),
            D=d, BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
        return d_gates.to(gates.dtype), *d_branches


def gated_sum_triton(
    gates: Tensor, compressed: Tensor, selected: Tensor, sliding: Tensor
) -> Tensor:
    """Eq. 5 in one pass: gates (b, h, n, 3) weigh the branches (b, h, n, d) ->
    (b, n, h * d), `combine_branches` followed by the rearrange to heads-last.

    The branches share one dtype, which the output takes.
    """
    require_runnable_kernels()
    branches = (compressed, selected, sliding)
    shape = compressed.shape
    for name, t in zip(("compressed", "selected", "sliding"), branches, strict=True):
        if t.ndim != 4 or t.shape != shape or t.dtype != compressed.dtype:
            raise ValueError(
                f"the branches must share one (b, h, n, d) shape and dtype, got {name} "
                f"{tuple(t.shape)} {t.dtype} against compressed {tuple(shape)} {compressed.dtype}"
            )
    if gates.shape != (*shape[:3], 3):
        raise ValueError(
            f"gates must be (b, h, n, 3) = {(*shape[:3], 3)}, got {tuple(gates.shape)}"
        )
    branches = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in branches)
    return _GatedSum.apply(gates, *branches)


def _strides(t: Tensor) -> tuple[int, int, int]:
    """The (b, h, n) strides of a (b, h, n, d) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


NORM_ROWS = 4  # rows per program of the RMSNorm forward, one after another
NORM_PARTIALS = 1024  # most programs of its backward: each sums its rows' d weight


@triton.jit
def _rms_norm_kernel(X, W, OUT, RSTD, rows, per_program, sx, eps, DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Program p: rows p * per_program, ... of X (rows, DIM), row stride sx, one at a time:
    rstd = 1 / sqrt(mean(x^2) + eps), OUT = x * rstd * W in float32, rounded once to OUT's
    dtype (OUT contiguous). Each row's rstd goes to RSTD (float32) for the backward."""
    features = tl.arange(0, BLOCK_D)
    ok = features < DIM
    w = tl.load(W + features, mask=ok, other=0.0).to(tl.float32)
    first = tl.program_id(0).to(tl.int64) * per_program
    for row in range(first, tl.minimum(first + per_program, rows)):
        x = tl.load(X + row * sx + features, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / DIM + eps)
        tl.store(RSTD + row, rstd)
        tl.store(OUT + row * DIM + features, (x * rstd * w).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_backward_kernel(X, W, RSTD, D_OUT, D_X, D_W, rows, per_program, sx, s_dout,
                              DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p, over the same kind of row range: d x = rstd * (w d_out - x rstd^2
    mean(d_out w x)) into D_X (contiguous, x's dtype), and this program's share of
    d weight, the sum over its rows of d_out x rstd, into row p of D_W (programs, DIM),
    float32: summed afterwards in a fixed order, so the result is deterministic."""
    features = tl.arange(0, BLOCK_D)
    ok = features < DIM
    w = tl.load(W + features, mask=ok, other=0.0).to(tl.float32)
    d_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    program = tl.program_id(0).to(tl.int64)
    first = program * per_program
    for row in range(first, tl.minimum(first + per_program, rows)):
        x = tl.load(X + row * sx + features, mask=ok, other=0.0).to(tl.float32)
        d_out = tl.load(D_OUT + row * s_dout + features, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        d_normed = d_out * w  # the gradient of x * rstd
        mean_dot = tl.sum(d_normed * x, 0) / DIM
        d_x = rstd * (d_normed - x * (rstd * rstd * mean_dot))
        tl.store(D_X + row * DIM + features, d_x.to(D_X.dtype.element_ty), mask=ok)
        d_w += d_out * (x * rstd)
    tl.store(D_W + program * DIM + features, d_w, mask=ok)


def _norm_launch(dim: int) -> dict:
    """Launch options of the RMSNorm kernels: a whole row per block, more warps past 1024."""
    return dict(DIM=dim, BLOCK_D=triton.next_power_of_2(dim), num_warps=4 if dim <= 1024 else 8)


def _rows_of(t: Tensor) -> Tensor:
    """t (..., dim) as a (rows, dim) matrix whose features are adjacent (stride 1)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = _rows_of(x)  # (r, dim)
        r, dim = rows.shape
        out = torch.empty((r, dim), device=x.device, dtype=x.dtype)
        rstd = torch.empty(r, device=x.device, dtype=torch.float32)
        _rms_norm_kernel[(triton.cdiv(r, NORM_ROWS),)](
            rows, weight, out, rstd, r, NORM_ROWS, rows.stride(0), eps, **_norm_launch(dim)
        )
        ctx.save_for_backward(rows, weight, rstd)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, None]:
        rows, weight, rstd = ctx.saved_tensors
        r, dim = rows.shape
        d_out_rows = _rows_of(d_out)
        per_program = max(NORM_ROWS, triton.cdiv(r, NORM_PARTIALS))
        programs = triton.cdiv(r, per_program)
        d_x = torch.empty((r, dim), device=rows.device, dtype=rows.dtype)
        d_w = torch.empty((programs, dim), device=rows.device, dtype=torch.float32)
        _rms_norm_backward_kernel[(programs,)](
            rows, weight, rstd, d_out_rows, d_x, d_w, r, per_program, rows.stride(0),
            d_out_rows.stride(0), **_norm_launch(dim),
        )  # fmt: skip
        return d_x.view(d_out.shape), d_w.sum(0).to(weight.dtype), None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`RMSNorm` (`rms_norm` in float32, rounded once to x's dtype) in one pass each way:
    x (..., dim), weight (dim,) -> (..., dim) contiguous, x's dtype.

    Autograd keeps x and one float32 rstd per row, not float32 copies of x; the weight's
    gradient is summed per program, then over programs, so it is deterministic.
    """
    require_runnable_kernels()
    require_kernel_dtype("x", x)
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (..., dim) tensor, got shape {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(
            f"weight must be 1-D of size x.shape[-1] = {x.shape[-1]}, got weight of shape "
            f"{tuple(weight.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be positive, got eps={eps!r}")
    require_kernel_device(x=x, weight=weight)
    return _RMSNorm.apply(x, weight.contiguous(), float(eps))
