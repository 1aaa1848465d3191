"""Checks for notebook 00: the warm-up exercise, full causal attention.

Full causal attention is what NSA approximates: every query i attends to every key
j <= i. The spec is a loop over queries, the clearest way to read the rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake


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


def _attention(q, k, v, *, scale=None, visible=torch.ge, softmax_dim=-1):
    """A vectorised attention whose details the mistakes below vary."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q.shape[-2]
    positions = torch.arange(n)
    mask = visible(positions[:, None], positions[None, :])  # (i, j): may query i see key j?
    scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(softmax_dim)
    return torch.einsum("b h i j, b h j d -> b h i d", weights, v)


def _cases() -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(1, 1, 1, 4), (2, 3, 5, 8), (1, 2, 9, 16)]
    return [
        Case(tuple(torch.randn(shape, generator=generator) for _ in range(3))) for shape in shapes
    ]


EXERCISES = [
    Exercise(
        name="causal_attention",
        stage="00",
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
        ),
    )
]
