"""Checks for notebook 01: RMSNorm and rotary embeddings.

Each spec is written the slow, obvious way (a loop over rows, pairs or positions),
so that it is easy to trust and independent of the package's vectorised code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nsa_tutorial.course.language import say
from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- RMSNorm -------------------------------------------------------------------


def rms_norm_spec(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (..., d): each row divided by sqrt(mean(row ** 2) + eps), times weight (d,)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r, row in enumerate(rows):
        out[r] = row / math.sqrt(row.pow(2).mean().item() + eps) * weight
    return out.reshape(x.shape)


def _rms_norm_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1)
    return [
        Case((torch.randn(2, 3, 16, generator=g), torch.randn(16, generator=g), 1e-6)),
        # small activations: here eps matters as much as the mean of squares
        Case((0.01 * torch.randn(4, 8, generator=g), torch.ones(8), 1e-2)),
        Case((torch.randn(3, 5, 7, generator=g) + 0.5, 1 + torch.rand(7, generator=g), 1e-5)),
    ]


def _normalise(x, weight, eps, *, statistic, axis=-1, eps_inside=True, root=torch.sqrt):
    value = statistic(x, axis)
    scale = root(value + eps) if eps_inside else root(value) + eps
    return x / scale * weight


def _mean_square(x, axis):
    return x.pow(2).mean(axis, keepdim=True)


RMS_NORM = Exercise(
    name="rms_norm",
    stage="01",
    hints=(
        (
            "x is (..., d): any number of leading axes, one vector of d features per row; weight "
            "is (d,), one gain per feature. The output has the shape of x."
        ),
        (
            "the rule, row by row: x / sqrt(mean(x ** 2) + eps) * weight. The mean runs over the "
            "last axis only, and eps sits inside the square root."
        ),
        (
            "a skeleton:\n"
            "    mean_square = x.pow(2).mean(dim=..., keepdim=...)  # (..., 1)\n"
            "    return x * torch.rsqrt(...) * ..."
        ),
    ),
    spec=rms_norm_spec,
    make_cases=_rms_norm_cases,
    mistakes=(
        Mistake(
            "eps is missing: add eps to the mean of squares before the square root.",
            lambda x, w, eps: _normalise(x, w, 0.0, statistic=_mean_square),
        ),
        Mistake(
            "eps is added after the square root; it belongs inside: sqrt(mean(x ** 2) + eps).",
            lambda x, w, eps: _normalise(x, w, eps, statistic=_mean_square, eps_inside=False),
        ),
        Mistake(
            "this divides by the mean of x; RMSNorm divides by the root of the mean of x ** 2.",
            lambda x, w, eps: _normalise(x, w, eps, statistic=lambda t, a: t.mean(a, keepdim=True)),
        ),
        Mistake(
            "the square root is missing: divide by sqrt(mean(x ** 2) + eps).",
            lambda x, w, eps: _normalise(x, w, eps, statistic=_mean_square, root=lambda t: t),
        ),
        Mistake(
            "the mean is taken over the wrong axis: normalise each vector over its last "
            "axis (dim=-1, keepdim=True).",
            lambda x, w, eps: _normalise(x, w, eps, statistic=_mean_square, axis=0),
        ),
        Mistake(
            "the mean is taken over the wrong axis: normalise each vector over its last "
            "axis (dim=-1, keepdim=True).",
            lambda x, w, eps: _normalise(x, w, eps, statistic=_mean_square, axis=-2),
        ),
        Mistake(
            "this subtracts the mean (that is LayerNorm); RMSNorm only rescales.",
            lambda x, w, eps: _normalise(
                x - x.mean(-1, keepdim=True), w, eps, statistic=_mean_square
            ),
        ),
        Mistake(
            "the learned gain is missing: multiply by weight at the end.",
            lambda x, w, eps: _normalise(x, torch.ones_like(w), eps, statistic=_mean_square),
        ),
    ),
)

# ---- rotary frequencies ------------------------------------------------------------


def rotary_frequencies_spec(dim_head: int, theta: float = 10000.0) -> Tensor:
    """Pair i of dim_head // 2 turns by theta ** (-2i / dim_head) radians per position."""
    return torch.tensor([theta ** (-2 * i / dim_head) for i in range(dim_head // 2)])


def _frequency_cases() -> list[Case]:
    return [Case((8, 10000.0)), Case((64, 10000.0)), Case((16, 500000.0)), Case((6, 100.0))]


def _diagnose_theta(got, expected, case: Case) -> str | None:
    """If `got` is a geometric series with another base, say which base it uses."""
    dim_head, theta = case.args
    if not isinstance(got, Tensor) or got.shape != expected.shape or len(got) < 2:
        return None
    if got.dtype != expected.dtype:  # a dtype mistake, which the verdict already names
        return None
    ratios = got[1:] / got[:-1]
    if not (got[0] - 1).abs() < 1e-4 or not torch.allclose(ratios, ratios[0], rtol=1e-3):
        return None
    base = ratios[0].item() ** (-dim_head / 2)
    if abs(base - theta) <= 1e-3 * theta:  # the right base: the difference lies elsewhere
        return None
    return say(
        "your frequencies fall off as if theta were {base}, but theta is {theta}. "
        "Check the base and the exponent -2i / dim_head.",
        base=f"{base:.4g}", theta=f"{theta:g}",
    )


ROTARY_FREQUENCIES = Exercise(
    name="rotary_frequencies",
    stage="01",
    hints=(
        (
            "the output holds one number per feature pair: shape (dim_head // 2,), float32. "
            "Entry i is how many radians pair i turns per position."
        ),
        (
            "the rule: pair i turns by theta ** (-2i / dim_head) radians per position: 1 for the "
            "first pair, then smaller and smaller. Use the `theta` argument."
        ),
        (
            "a skeleton:\n"
            "    exponents = torch.arange(0, dim_head, 2).float() / ...  # 2i / dim_head\n"
            "    return 1.0 / theta ** ..."
        ),
    ),
    spec=rotary_frequencies_spec,
    make_cases=_frequency_cases,
    mistakes=(
        Mistake(
            "theta is fixed at 10000; use the `theta` argument.",
            lambda d, theta: rotary_frequencies_spec(d, 10000.0),
        ),
        Mistake(
            "the exponent is i / dim_head; it is 2i / dim_head "
            "(torch.arange(0, dim_head, 2) / dim_head).",
            lambda d, theta: torch.tensor([theta ** (-i / d) for i in range(d // 2)]),
        ),
        Mistake(
            "the exponent's sign is flipped: frequencies must shrink, theta ** (-2i / dim_head).",
            lambda d, theta: 1 / rotary_frequencies_spec(d, theta),
        ),
        Mistake(
            "return one frequency per pair, shape (dim_head // 2,), not one per feature.",
            lambda d, theta: rotary_frequencies_spec(d, theta).repeat_interleave(2),
        ),
    ),
    diagnose=_diagnose_theta,
)

# ---- rotating pairs -------------------------------------------------------------------


def rotate_pairs_spec(x: Tensor) -> Tensor:
    """(a0, b0, a1, b1, ...) -> (-b0, a0, -b1, a1, ...), pair by pair."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[-1], 2):
        out[..., i] = -x[..., i + 1]
        out[..., i + 1] = x[..., i]
    return out


def _halves_rotate(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_pairs_cases() -> list[Case]:
    g = torch.Generator().manual_seed(2)
    return [Case((torch.randn(shape, generator=g),)) for shape in [(2, 3, 8), (1, 4, 2), (5, 6)]]


_HALVES_HINT = (
    "this pairs the two halves of the vector (x[i], x[i + d/2]); rotary-embedding-torch, "
    "and so NSA, pairs neighbours (x[2i], x[2i + 1])."
)

ROTATE_PAIRS = Exercise(
    name="rotate_pairs",
    stage="01",
    hints=(
        (
            "x is (..., d) with d even; features 2i and 2i + 1 form pair i (neighbours, not the "
            "two halves of the vector). The output has the shape of x."
        ),
        (
            "the rule: each pair (a, b) becomes (-b, a), a quarter turn: out[..., 2i] = -x[..., "
            "2i + 1] and out[..., 2i + 1] = x[..., 2i]."
        ),
        (
            "a skeleton:\n"
            '    pairs = rearrange(x, "... (d r) -> ... d r", r=2)\n'
            "    a, b = pairs.unbind(dim=-1)\n"
            "    turned = torch.stack((..., ...), dim=-1)\n"
            '    return rearrange(turned, "... d r -> ... (d r)")'
        ),
    ),
    spec=rotate_pairs_spec,
    make_cases=_rotate_pairs_cases,
    mistakes=(
        Mistake(_HALVES_HINT, _halves_rotate),
        Mistake(
            "this turns each pair (a, b) into (b, -a), a quarter turn the wrong way; "
            "it should give (-b, a).",
            lambda x: -rotate_pairs_spec(x),
        ),
        Mistake(
            "this swaps each pair without the minus sign; (a, b) becomes (-b, a).",
            lambda x: rotate_pairs_spec(x) * torch.tensor([-1.0, 1.0]).repeat(x.shape[-1] // 2),
        ),
    ),
)

# ---- applying the rotation ----------------------------------------------------------------


def apply_rotary_spec(x: Tensor, freqs: Tensor, offset: int = 0) -> Tensor:
    """Turn pair i of the token at position p (counted from offset) by the angle p * freqs[i]."""
    out = x.clone()
    for p in range(x.shape[-2]):
        for i, freq in enumerate(freqs):
            angle = torch.tensor(float(p + offset)) * freq
            a, b = x[..., p, 2 * i], x[..., p, 2 * i + 1]
            out[..., p, 2 * i] = a * angle.cos() - b * angle.sin()
            out[..., p, 2 * i + 1] = a * angle.sin() + b * angle.cos()
    return out


def _rotate(x, freqs, offset, *, rotate=rotate_pairs_spec, pair_angles="interleaved"):
    """A vectorised rotation whose pairing and positions the mistakes below vary."""
    positions = torch.arange(x.shape[-2], dtype=torch.float32) + offset
    angles = positions[:, None] * freqs[None, :]  # (n, d/2)
    if pair_angles == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat((angles, angles), dim=-1)
    return x * angles.cos() + rotate(x) * angles.sin()


def _apply_rotary_cases() -> list[Case]:
    freqs = rotary_frequencies_spec
    g = torch.Generator().manual_seed(3)
    return [
        Case((torch.randn(2, 5, 8, generator=g), freqs(8))),
        Case((torch.randn(1, 2, 7, 16, generator=g), freqs(16)), {"offset": 3}),
        Case((torch.randn(6, 4, generator=g), freqs(4, 100.0))),
        Case((torch.randn(3, 9, 32, generator=g), freqs(32)), {"offset": 100}),
    ]


APPLY_ROTARY = Exercise(
    name="apply_rotary",
    stage="01",
    hints=(
        (
            "x is (..., n, d): n tokens of d features; freqs is (d // 2,), one per pair. Row p "
            "of x sits at position offset + p."
        ),
        (
            "the rule: pair i of the token at position p turns by the angle p * freqs[i]; out = "
            "x * cos(angle) + rotate_pairs(x) * sin(angle), where both features of a pair get "
            "their pair's angle."
        ),
        (
            "a skeleton:\n"
            "    positions = torch.arange(x.shape[-2], dtype=torch.float32) + ...  # (n,)\n"
            "    angles = positions[:, None] * freqs[None, :]  # (n, d/2)\n"
            "    angles = angles.repeat_interleave(..., dim=-1)  # (n, d)\n"
            "    return x * angles.cos() + ..."
        ),
    ),
    spec=apply_rotary_spec,
    make_cases=_apply_rotary_cases,
    mistakes=(
        Mistake(
            _HALVES_HINT,
            lambda x, f, offset=0: _rotate(
                x, f, offset, rotate=_halves_rotate, pair_angles="halves"
            ),
        ),
        Mistake(
            "the angles are laid out as two halves (torch.cat((a, a))); each pair's angle must "
            "sit on both of its neighbouring features (repeat_interleave or einops "
            "repeat '... f -> ... (f r)', r=2).",
            lambda x, f, offset=0: _rotate(x, f, offset, pair_angles="halves"),
        ),
        Mistake(
            "the offset is ignored: the token at row p sits at position offset + p.",
            lambda x, f, offset=0: _rotate(x, f, 0),
        ),
        Mistake(
            "positions start at 1; the first token (with offset 0) sits at position 0.",
            lambda x, f, offset=0: _rotate(x, f, offset + 1),
        ),
        Mistake(
            "this rotates by minus the angle: it is x * cos + rotate_pairs(x) * sin.",
            lambda x, f, offset=0: _rotate(x, -f, offset),
        ),
    ),
    atol=1e-4,
)

EXERCISES = [RMS_NORM, ROTARY_FREQUENCIES, ROTATE_PAIRS, APPLY_ROTARY]
