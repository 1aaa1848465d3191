"""Checks for notebook 06: the strategy gates and the gated sum of the branches (Eq. 5)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake


def strategy_gates_spec(x: Tensor, weight: Tensor, bias: Tensor, heads: int) -> Tensor:
    """x (b, n, dim) -> (b, heads, n, 3): sigmoid(x @ weight.T + bias), output features
    ordered head by head, (compressed, selected, sliding) within each head."""
    b, n, _ = x.shape
    out = torch.empty(b, heads, n, 3)
    logits = x @ weight.T + bias  # (b, n, 3 * heads)
    for h in range(heads):
        for s in range(3):
            out[:, h, :, s] = torch.sigmoid(logits[..., h * 3 + s])
    return out


def _gates(x, weight, bias, heads, *, order="(h s)", activation=torch.sigmoid, with_bias=True):
    logits = x @ weight.T + (bias if with_bias else 0)
    return rearrange(activation(logits), f"b n {order} -> b h n s", h=heads)


def _gate_cases() -> list[Case]:
    g = torch.Generator().manual_seed(60)
    return [
        Case(
            (
                torch.randn(1, 5, 4, generator=g),
                torch.randn(6, 4, generator=g),
                torch.randn(6, generator=g),
                2,
            )
        ),
        Case(
            (
                torch.randn(2, 3, 8, generator=g),
                torch.randn(12, 8, generator=g),
                torch.randn(12, generator=g),
                4,
            )
        ),
    ]


STRATEGY_GATES = Exercise(
    name="strategy_gates",
    stage="06",
    hints=(
        (
            "x is (b, n, dim); weight (3 * heads, dim) and bias (3 * heads,) form a linear layer "
            "with three outputs per head. The output is (b, heads, n, 3): for each head and "
            "token, the gates of (compressed, selected, sliding)."
        ),
        (
            "the rule (Eq. 5): gates = sigmoid(x @ weight.T + bias), each gate on its own (no "
            "softmax); output feature 3 * h + c is head h's gate for branch c."
        ),
        (
            "a skeleton:\n"
            "    logits = x @ weight.T + bias  # (b, n, 3 * heads)\n"
            '    return rearrange(torch.sigmoid(logits), "b n (h s) -> ...", h=heads)'
        ),
    ),
    spec=strategy_gates_spec,
    make_cases=_gate_cases,
    mistakes=(
        Mistake(
            "the gates are a sigmoid each, not a softmax over the three branches (Eq. 5 does "
            "not make them sum to 1).",
            lambda *a: _gates(
                *a,
                activation=lambda t: rearrange(
                    rearrange(t, "b n (h s) -> b n h s", s=3).softmax(-1), "b n h s -> b n (h s)"
                ),
            ),
        ),
        Mistake(
            "the output features are ordered head by head: 'b n (h s) -> b h n s', not '(s h)'.",
            lambda *a: _gates(*a, order="(s h)"),
        ),
        Mistake("the bias is missing.", lambda *a: _gates(*a, with_bias=False)),
    ),
)


def combine_branches_spec(
    gates: Tensor, compressed: Tensor, selected: Tensor, sliding: Tensor
) -> Tensor:
    """gates (b, h, n, 3), branches (b, h, n, d) -> sum over c of gates[..., c] * branch c."""
    out = torch.zeros_like(compressed)
    for c, branch in enumerate((compressed, selected, sliding)):
        out += gates[..., c : c + 1] * branch
    return out


def _combine_cases() -> list[Case]:
    g = torch.Generator().manual_seed(61)
    return [
        Case(
            (
                torch.rand(2, 3, 5, 3, generator=g),
                *torch.randn(3, 2, 3, 5, 4, generator=g).unbind(0),
            )
        )
    ]


COMBINE_BRANCHES = Exercise(
    name="combine_branches",
    stage="06",
    hints=(
        "gates is (b, h, n, 3); each branch is (b, h, n, d). The output is (b, h, n, d).",
        (
            "the rule (Eq. 5): gates[..., 0] * compressed + gates[..., 1] * selected + "
            "gates[..., 2] * sliding, each gate spread over the d features of its branch."
        ),
        (
            "a skeleton: slice the gates so that they keep their last axis, gates[..., 0:1] is "
            "(b, h, n, 1) and broadcasts over d, then gates[..., 0:1] * compressed + ..."
        ),
    ),
    spec=combine_branches_spec,
    make_cases=_combine_cases,
    mistakes=(
        Mistake(
            "the gates are in the order (compressed, selected, sliding); yours are the other "
            "way round.",
            lambda g, c, s, w: combine_branches_spec(g.flip(-1), c, s, w),
        ),
        Mistake(
            "this averages the branches; weight each by its gate.",
            lambda g, c, s, w: (c + s + w) / 3,
        ),
    ),
)

EXERCISES = [STRATEGY_GATES, COMBINE_BRANCHES]
