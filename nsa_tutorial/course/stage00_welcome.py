"""Checks for notebook 00: the two warm-up exercises.

- `stable_softmax`: a softmax that subtracts each row's maximum, so that large scores
  cannot overflow (every attention branch, and every kernel, relies on it);
- `causal_attention`: full causal attention, what NSA approximates: every query i
  attends to every key j <= i.

The specs loop over rows and queries, the clearest way to read the rules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- warm-up 1: a softmax that cannot overflow ---------------------------------------------


def stable_softmax_spec(scores: Tensor) -> Tensor:
    """scores (..., n) -> (..., n): each row's exp(s - m) / sum(exp(s - m)), m the row's
    maximum; a score of -inf (a hidden key) gets 0."""
    rows = scores.reshape(-1, scores.shape[-1])
    out = torch.empty_like(rows)
    for r, row in enumerate(rows.tolist()):
        top = max(row)
        weights = [math.exp(s - top) for s in row]
        out[r] = torch.tensor([w / sum(weights) for w in weights])
    return out.reshape(scores.shape)


def _softmax_cases() -> list[Case]:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, 7, generator=g)
    hidden[..., 1::3] = float("-inf")  # hidden keys, never a whole row
    levels = torch.tensor([[0.0], [500.0], [-500.0]])  # rows far apart from each other
    return [
        Case((torch.randn(3, 5, generator=g),)),
        Case((hidden,)),
        Case((100 * torch.randn(2, 6, generator=g),)),  # scores in the hundreds
        Case((torch.randn(4, 3, generator=g) - 1000,)),  # every score far below zero
        Case((torch.randn(3, 4, generator=g) + levels,)),
        Case((torch.randn(8, generator=g),)),  # a single row
    ]


def _softmax_with(scores, *, top=None, dim=-1, normalise=True):
    """exp(scores - top) / its sum over `dim`; the defaults give the stable softmax."""
    top = scores.amax(dim=dim, keepdim=True) if top is None else top
    weights = (scores - top).exp()
    return weights / weights.sum(dim, keepdim=True) if normalise else weights


STABLE_SOFTMAX = Exercise(
    name="stable_softmax",
    stage="00",
    hints=(
        (
            "scores is (..., n): any number of leading axes and one row of n scores per "
            "query, some of them -inf (hidden keys). The output has the same shape: each "
            "row becomes probabilities that sum to 1."
        ),
        (
            "the rule: softmax(s)_j = exp(s_j - m) / sum_k exp(s_k - m) with m the row's "
            "maximum. Subtracting m changes nothing mathematically, but keeps every exp() "
            "between 0 and 1, so scores in the hundreds (or far below zero) cannot overflow "
            "or all vanish; exp(-inf) = 0 hides a key."
        ),
        (
            "a skeleton:\n"
            "    top = scores.amax(dim=..., keepdim=...)  # (..., 1): each row's maximum\n"
            "    weights = torch.exp(...)\n"
            "    return weights / ..."
        ),
    ),
    spec=stable_softmax_spec,
    make_cases=_softmax_cases,
    mistakes=(
        Mistake(
            "exp() of the raw scores overflows above about 88 and gives 0 for every score "
            "far below zero (0 / 0 = NaN): subtract each row's maximum before exp.",
            lambda s: _softmax_with(s, top=torch.zeros(())),
        ),
        Mistake(
            "the maximum is taken over the whole tensor: take each row's own "
            "(dim=-1, keepdim=True), or a row far below the others underflows to 0 / 0.",
            lambda s: _softmax_with(s, top=s.max()),
        ),
        Mistake(
            "the rows are the last axis: take the maximum and the sum over dim=-1, not dim=0.",
            lambda s: _softmax_with(s, dim=0),
        ),
        Mistake(
            "the weights are not normalised: divide exp(s - max) by its sum over the row.",
            lambda s: _softmax_with(s, normalise=False),
        ),
        Mistake(
            "the row maximum lost its last axis, so it does not line up with the rows: "
            "keep it with keepdim=True (shape (..., 1)).",
            lambda s: _softmax_with(s, top=s.amax(dim=-1)),
        ),
    ),
)

# ---- warm-up 2: full causal attention ----------------------------------------------------


def causal_attention_spec(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v (b, h, n, d) -> (b, h, n, d): query i takes a softmax-weighted mean of v[:i+1]."""
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for i in range(q.shape[-2]):
        scores = torch.einsum("b h d, b h j d -> b h j", q[..., i, :], k[..., : i + 1, :]) * scale
        out[..., i, :] = torch.einsum(
            "b h j, b h j d -> b h d", scores.softmax(-1), v[..., : i + 1, :]
        )
    return out


HINT_OVERFLOW = (
    "exp() of the raw scores overflows once a score passes about 88 (float32; this case "
    "has scores in the hundreds): subtract each row's maximum before exp, or use "
    "torch.softmax, which does."
)


def softmax_without_max(scores: Tensor, dim: int = -1) -> Tensor:
    """exp(scores) / sum(exp(scores)) with no maximum subtracted first: a hand-written
    softmax that is right for small scores and gives inf / inf = NaN for large ones."""
    weights = scores.exp()
    return weights / weights.sum(dim, keepdim=True)


def _attention(q, k, v, *, scale=None, visible=torch.ge, softmax_dim=-1, softmax=None):
    """A vectorised attention whose details the mistakes below vary."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q.shape[-2]
    positions = torch.arange(n)
    mask = visible(positions[:, None], positions[None, :])  # (i, j): may query i see key j?
    scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(softmax_dim) if softmax is None else softmax(scores, softmax_dim)
    return torch.einsum("b h i j, b h j d -> b h i d", weights, v)


def _cases() -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1, 4), (2, 3, 5, 8), (1, 2, 9, 16)]
    cases = [
        Case(tuple(torch.randn(shape, generator=generator) for _ in range(3))) for shape in shapes
    ]
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    return [*cases, Case((100 * q, k, v))]  # scores in the hundreds: exp() overflows


EXERCISES = [
    STABLE_SOFTMAX,
    Exercise(
        name="causal_attention",
        stage="00",
        hints=(
            (
                "q, k and v are (batch, heads, n, dim_head). The scores of every query i with "
                "every key j form a (batch, heads, n, n) tensor: row i is query i, column j is "
                "key j."
            ),
            (
                "the rule: scores = q·k * dim_head ** -0.5; query i may see key j only when j <= "
                "i (a lower-triangular mask, the diagonal included); softmax over keys (the last "
                "axis); then a weighted sum of the values."
            ),
            (
                "a skeleton:\n"
                '    scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * ...\n'
                "    causal = torch.ones(n, n, dtype=torch.bool).tril()\n"
                '    scores = scores.masked_fill(..., float("-inf"))\n'
                '    return torch.einsum("b h i j, b h j d -> b h i d", scores.softmax(dim=...), '
                "v)"
            ),
        ),
        spec=causal_attention_spec,
        make_cases=_cases,
        mistakes=(
            Mistake(
                "the scores are not scaled: multiply q·k by dim_head ** -0.5.",
                lambda q, k, v: _attention(q, k, v, scale=1.0),
            ),
            Mistake(
                "the scores are divided by dim_head; the scale is dim_head ** -0.5.",
                lambda q, k, v: _attention(q, k, v, scale=q.shape[-1] ** -1),
            ),
            Mistake(
                "query i must also see key i (j <= i): your mask hides the diagonal.",
                lambda q, k, v: _attention(q, k, v, visible=torch.gt),
            ),
            Mistake(
                "no causal mask: query i may only see keys j <= i.",
                lambda q, k, v: _attention(
                    q, k, v, visible=lambda i, j: torch.ones_like(i * j) > 0
                ),
            ),
            Mistake(
                "the mask is the wrong way round: query i sees keys j >= i (the future).",
                lambda q, k, v: _attention(q, k, v, visible=torch.le),
            ),
            Mistake(
                "the softmax runs over queries (dim=-2); it must run over keys (dim=-1).",
                lambda q, k, v: _attention(q, k, v, softmax_dim=-2),
            ),
            Mistake(
                HINT_OVERFLOW, lambda q, k, v: _attention(q, k, v, softmax=softmax_without_max)
            ),
        ),
    ),
]
