"""Checks for notebook 05: the sliding-window mask and attention."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.stage00_welcome import HINT_OVERFLOW, softmax_without_max
from nsa_tutorial.course.verdict import Case, Exercise, Mistake


def sliding_window_mask_spec(seq_len: int, window: int, causal: bool) -> Tensor:
    """(seq_len, seq_len): query i sees keys i - window .. i (not causal: .. i + window)."""
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        last = i if causal else min(i + window, seq_len - 1)
        for j in range(max(i - window, 0), last + 1):
            mask[i, j] = True
    return mask


def _mask(seq_len, window, causal, *, back=0, forward=None):
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    ahead = (0 if causal else window) if forward is None else forward
    return (j >= i - window + back) & (j <= i + ahead)


SLIDING_WINDOW_MASK = Exercise(
    name="sliding_window_mask",
    stage="05",
    hints=(
        "the output is (seq_len, seq_len), bool: row i is a query, column j a key.",
        (
            "the rule: query i sees keys i - window .. i (window + 1 keys, itself included); "
            "when not causal, also the keys up to i + window."
        ),
        (
            "a skeleton:\n"
            "    i = torch.arange(seq_len)[:, None]\n"
            "    j = torch.arange(seq_len)[None, :]\n"
            "    return (j >= ...) & (j <= ...)"
        ),
    ),
    spec=sliding_window_mask_spec,
    make_cases=lambda: [
        Case((10, 3, True)),
        Case((9, 2, False)),
        Case((3, 8, True)),
        Case((1, 1, False)),
    ],
    mistakes=(
        Mistake(
            "off by one: the window holds the query and the `window` tokens before it "
            "(keys i - window .. i, window + 1 of them).",
            lambda n, w, causal: _mask(n, w, causal, back=1),
        ),
        Mistake(
            "a causal query must not see keys after itself (j <= i).",
            lambda n, w, causal: _mask(n, w, causal, forward=w),
        ),
        Mistake(
            "not causal, the window reaches `window` tokens ahead too (keys .. i + window).",
            lambda n, w, causal: _mask(n, w, causal, forward=0),
        ),
    ),
)


def sliding_window_attention_spec(
    q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool
) -> Tensor:
    """q (b, hq, n, d) over k, v (b, hk, n, d): each query attends within its window."""
    hq, n, d = q.shape[1:]
    group = hq // k.shape[1]
    mask = sliding_window_mask_spec(n, window, causal)
    out = torch.empty_like(q)
    for h in range(hq):
        for i in range(n):
            keys = mask[i]
            scores = torch.einsum("b d, b j d -> b j", q[:, h, i], k[:, h // group, keys]) * d**-0.5
            out[:, h, i] = torch.einsum(
                "b j, b j d -> b d", scores.softmax(-1), v[:, h // group, keys]
            )
    return out


def _attention_with(
    q, k, v, window, causal, *, mask=None, scale=None, softmax=None, heads_repeat="interleave"
):
    n = q.shape[-2]
    group = q.shape[1] // k.shape[1]
    if heads_repeat == "interleave":  # head h reads h // group
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    else:  # head h reads h % kv_heads
        k, v = (t.repeat(1, group, 1, 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    visible = sliding_window_mask_spec(n, window, causal) if mask is None else mask
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) if softmax is None else softmax(scores)) @ v


def _attention_cases() -> list[Case]:
    g = torch.Generator().manual_seed(50)

    def case(b, hq, hk, n, d, window, causal, loud=1.0):
        q, k, v = (torch.randn(b, h, n, d, generator=g) for h in (hq, hk, hk))
        return Case((loud * q, k, v, window, causal))

    return [
        case(1, 2, 2, 12, 4, 3, True),
        case(2, 4, 2, 9, 4, 2, True),
        case(1, 4, 1, 8, 4, 2, False),
        case(1, 4, 2, 10, 4, 3, True, loud=100.0),  # scores in the hundreds
    ]


SLIDING_WINDOW_ATTENTION = Exercise(
    name="sliding_window_attention",
    stage="05",
    hints=(
        (
            "q is (b, hq, n, d); k and v are (b, hk, n, d), and query head h reads key/value "
            "head h // (hq // hk). The output is (b, hq, n, d)."
        ),
        (
            "the rule: plain softmax attention scaled by d ** -0.5, with the keys outside each "
            "query's window hidden (sliding_window_mask) before the softmax."
        ),
        (
            "a skeleton:\n"
            "    k, v = (t.repeat_interleave(..., dim=1) for t in (k, v))\n"
            "    scores = q @ k.transpose(-1, -2) * ...\n"
            "    mask = sliding_window_mask(...)\n"
            "    return scores.masked_fill(~mask, ...).softmax(dim=-1) @ v"
        ),
    ),
    spec=sliding_window_attention_spec,
    make_cases=_attention_cases,
    mistakes=(
        Mistake(
            "off by one: the window holds the query and the `window` tokens before it.",
            lambda q, k, v, w, c: _attention_with(
                q, k, v, w, c, mask=_mask(q.shape[-2], w, c, back=1)
            ),
        ),
        Mistake(
            "the scores are not scaled by dim_head ** -0.5.",
            lambda q, k, v, w, c: _attention_with(q, k, v, w, c, scale=1.0),
        ),
        Mistake(
            "the window is ignored: this attends to every earlier key.",
            lambda q, k, v, w, c: _attention_with(q, k, v, q.shape[-2], c),
        ),
        Mistake(
            "query heads are matched to key/value heads the wrong way: query head h reads "
            "head h // (hq // hk) (repeat_interleave), not h % hk (repeat).",
            lambda *a: _attention_with(*a, heads_repeat="tile"),
        ),
        Mistake(HINT_OVERFLOW, lambda *a: _attention_with(*a, softmax=softmax_without_max)),
    ),
)

EXERCISES = [SLIDING_WINDOW_MASK, SLIDING_WINDOW_ATTENTION]
