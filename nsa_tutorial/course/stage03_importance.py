"""Checks for notebook 03: importance scores from compressed attention logits."""

from __future__ import annotations

import torch
from einops import reduce, repeat
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- GQA: one score per key/value head ----------------------------------------------------


def group_mean_spec(scores: Tensor, group_size: int) -> Tensor:
    """(b, h * g, i, j) -> (b, h, i, j): key/value head h averages query heads h*g .. h*g+g-1."""
    b, hq, i, j = scores.shape
    out = scores.new_zeros(b, hq // group_size, i, j)
    for h in range(hq // group_size):
        for g in range(group_size):
            out[:, h] += scores[:, h * group_size + g] / group_size
    return out


def _group_cases() -> list[Case]:
    g = torch.Generator().manual_seed(30)
    return [
        Case((torch.randn(1, 2, 3, 4, generator=g), 1)),
        Case((torch.randn(2, 4, 5, 3, generator=g), 2)),
        Case((torch.randn(1, 8, 2, 6, generator=g), 4)),
    ]


GROUP_MEAN = Exercise(
    name="group_mean",
    stage="03",
    hints=(
        (
            "scores is (b, h * g, i, j): one score per query head. The output (b, h, i, j) has "
            "one per key/value head; g query heads share each key/value head."
        ),
        (
            "the rule: key/value head h averages the consecutive query heads h * g .. h * g + g "
            "- 1 (a mean: not a sum, not a maximum)."
        ),
        (
            'a skeleton: split the head axis into (h, g), with reshape or einops "b (h g) i j -> '
            'b h g i j", then take .mean(dim=...) over g.'
        ),
    ),
    spec=group_mean_spec,
    make_cases=_group_cases,
    mistakes=(
        Mistake(
            "heads are grouped the wrong way: key/value head h owns the *consecutive* query "
            "heads h * g .. h * g + g - 1 (einops 'b (h g) i j').",
            lambda s, g: reduce(s, "b (g h) i j -> b h i j", "mean", g=g),
        ),
        Mistake(
            "this sums the group; average it (divide by the group size).",
            lambda s, g: reduce(s, "b (h g) i j -> b h i j", "sum", g=g),
        ),
        Mistake(
            "this takes the group's maximum; the reference averages.",
            lambda s, g: reduce(s, "b (h g) i j -> b h i j", "max", g=g),
        ),
    ),
)

# ---- from compression blocks to selection blocks ---------------------------------------------


def selection_block_scores_spec(scores: Tensor, stride: int, selection_block: int) -> Tensor:
    """(..., w) -> (..., w * stride // selection_block): token t carries the score of
    compressed block t // stride; each complete selection block averages its tokens."""
    num_blocks = scores.shape[-1] * stride // selection_block
    out = scores.new_zeros(*scores.shape[:-1], num_blocks)
    for block in range(num_blocks):
        for t in range(block * selection_block, (block + 1) * selection_block):
            out[..., block] += scores[..., t // stride] / selection_block
    return out


def _block_cases() -> list[Case]:
    g = torch.Generator().manual_seed(31)
    return [
        Case((torch.randn(1, 1, 4, 6, generator=g), 4, 8)),
        Case((torch.randn(2, 2, 3, 7, generator=g), 4, 8)),  # odd number of compressed blocks
        Case((torch.randn(1, 2, 5, 9, generator=g), 2, 8)),
        Case((torch.randn(1, 1, 2, 1, generator=g), 4, 8)),  # not one full selection block yet
        Case((torch.randn(1, 2, 3, 7, generator=g), 4, 6)),  # 6 is no multiple of the stride
        Case((torch.randn(2, 1, 3, 5, generator=g), 16, 8)),  # notebook 03's demo: stride > block
        Case((torch.randn(1, 1, 4, 8, generator=g), 3, 8)),  # a compressed block straddles two
    ]


def _compressed_blocks_per_selection(scores, stride, block):
    """Average block // stride compressed scores per selection block: right only when the
    stride divides the selection block."""
    ratio = block // stride
    kept = scores[..., : scores.shape[-1] // max(ratio, 1) * ratio]
    return reduce(kept, "... (w r) -> ... w", "mean", r=ratio)


def _pad_partial(scores, stride, block):
    tokens = repeat(scores, "... w -> ... (w s)", s=stride)
    tokens = torch.nn.functional.pad(tokens, (0, -tokens.shape[-1] % block))
    return reduce(tokens, "... (w l) -> ... w", "mean", l=block)


SELECTION_BLOCK_SCORES = Exercise(
    name="selection_block_scores",
    stage="03",
    hints=(
        (
            "scores is (..., w): one score per compressed block, a new block every `stride` "
            "tokens. The output (..., w * stride // selection_block) has one score per complete "
            "selection block of selection_block tokens."
        ),
        (
            "the rule: think in tokens. Token t carries the score of compressed block t // "
            "stride; selection block k averages its selection_block tokens; a last, partial "
            "selection block is dropped. Going through tokens works whether or not stride "
            "divides selection_block (stride 16 with blocks of 8 too)."
        ),
        (
            "a skeleton:\n"
            "    tokens = scores.repeat_interleave(stride, dim=-1)  # (..., w * stride)\n"
            "    num_blocks = ... // selection_block\n"
            "    tokens = tokens[..., : num_blocks * selection_block]\n"
            "    return tokens.reshape(..., num_blocks, selection_block).mean(dim=...)"
        ),
    ),
    spec=selection_block_scores_spec,
    make_cases=_block_cases,
    mistakes=(
        Mistake(
            "a last, partial selection block must be dropped (the sliding window covers it): "
            "keep (w * stride) // selection_block blocks.",
            _pad_partial,
        ),
        Mistake(
            "this groups selection_block // stride compressed scores per selection block, "
            "which is right only when the stride divides the selection block (not for stride "
            "4 and blocks of 6, nor stride 16 and blocks of 8): go through tokens, each "
            "carrying the score of compressed block t // stride.",
            _compressed_blocks_per_selection,
        ),
        Mistake(
            "this takes each selection block's maximum; average its scores.",
            lambda s, st, b: reduce(
                repeat(s, "... w -> ... (w r)", r=st)[..., : s.shape[-1] * st // b * b],
                "... (w l) -> ... w",
                "max",
                l=b,
            ),
        ),
    ),
)

# ---- masking the own block, softmax with a sink ------------------------------------------------

SINK = -1e3


def block_probabilities_spec(scores: Tensor, selection_block: int) -> Tensor:
    """scores (..., i, w): hide query i's own block i // selection_block, then softmax over
    blocks together with one extra logit of -1000 (the sink), which is dropped."""
    out = torch.empty_like(scores)
    hidden = -torch.finfo(scores.dtype).max
    for i in range(scores.shape[-2]):
        row = scores[..., i, :].clone()
        own = i // selection_block
        if own < row.shape[-1]:
            row[..., own] = hidden
        sink = torch.full((*row.shape[:-1], 1), SINK)
        out[..., i, :] = torch.cat((sink, row), dim=-1).softmax(-1)[..., 1:]
    return out


def _softmax_with(scores, block, *, mask_own=True, dim=-1, sink=True, own_of=None):
    scores = scores.clone()
    if mask_own:
        own = (own_of or (lambda i: i // block))(torch.arange(scores.shape[-2]))
        hide = own[:, None] == torch.arange(scores.shape[-1])[None, :]
        scores = scores.masked_fill(hide, -torch.finfo(scores.dtype).max)
    if not sink:
        return scores.softmax(dim)
    padded = torch.nn.functional.pad(scores, (1, 0), value=SINK)
    return padded.softmax(dim)[..., 1:]


def _probability_cases() -> list[Case]:
    g = torch.Generator().manual_seed(32)
    return [
        Case((torch.randn(1, 2, 20, 3, generator=g), 8)),
        Case((torch.randn(2, 1, 9, 4, generator=g), 2)),
        Case((3 * torch.randn(1, 1, 6, 2, generator=g) - 1004, 4)),  # all blocks far below the sink
    ]


BLOCK_PROBABILITIES = Exercise(
    name="block_probabilities",
    stage="03",
    hints=(
        (
            "scores is (..., i, w): for each query i, one score per selection block. The output "
            "has the same shape: probabilities over blocks that sum to at most 1 per query."
        ),
        (
            "the rule: hide query i's own block i // selection_block (the most negative float; "
            "fine attention adds that block anyway), then softmax over the blocks with one extra "
            "logit of -1000 in front (the sink), and drop the sink's column."
        ),
        (
            "a skeleton:\n"
            "    own = ...  # (i,): each query's own block\n"
            "    hide = own[:, None] == ...  # (i, w): True in the own block's column\n"
            "    scores = scores.masked_fill(hide, ...)\n"
            "    sink = torch.full((*scores.shape[:-1], 1), -1e3)\n"
            "    return torch.cat((sink, scores), dim=-1).softmax(dim=-1)[...]"
        ),
    ),
    spec=block_probabilities_spec,
    make_cases=_probability_cases,
    mistakes=(
        Mistake(
            "the query's own block is not masked: fill column i // selection_block with the "
            "most negative float before the softmax (fine attention adds that block anyway).",
            lambda s, b: _softmax_with(s, b, mask_own=False),
        ),
        Mistake(
            "the softmax runs over queries (dim=-2); it must run over blocks (dim=-1).",
            lambda s, b: _softmax_with(s, b, dim=-2),
        ),
        Mistake(
            "the sink is missing: put one extra logit of -1000 in front of the blocks, "
            "softmax, then drop it.",
            lambda s, b: _softmax_with(s, b, sink=False),
        ),
        Mistake(
            "the wrong block is masked: query i's own block is i // selection_block.",
            lambda s, b: _softmax_with(s, b, own_of=lambda i: i // b - 1),
        ),
    ),
)

EXERCISES = [GROUP_MEAN, SELECTION_BLOCK_SCORES, BLOCK_PROBABILITIES]
