"""Checks for notebook 03: importance scores from compressed attention logits."""

from __future__ import annotations

import torch
from einops import reduce, repeat
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake
from nsa_tutorial.gqa import masked_logit

# ---- GQA: one score per key/value head ----------------------------------------------------


def group_mean_spec(scores: Tensor, group_size: int) -> Tensor:
    """(b, h * g, i, j) -> (b, h, i, j): key/value head h averages query heads h*g .. h*g+g-1."""
    b, hq, i, j = scores.shape
    out = scores.new_zeros(b, hq // group_size, i, j)
    for h in range(hq // group_size):
        for g in range(group_size):
            out[:, h] += scores[:, h * group_size + g] / group_size
    return out


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

# ---- the chain: compressed logits -> selection-block importance -----------------------------


def importance_scores_spec(
    logits: Tensor,
    num_memory: int,
    stride: int,
    selection_block: int,
    group_size: int | None,
    interpolate: bool,
    causal: bool,
) -> Tensor:
    """Compressed attention logits (b, hq, i, m + w) -> selection-block probabilities
    (b, h, i, blocks): memory dropped, averaged over each GQA group (unless group_size is
    None), mapped onto selection blocks, own block hidden, softmax with the sink. When the
    stride equals the selection block, the reference maps nothing and hides nothing: only
    the softmax with the sink."""
    scores = logits[..., num_memory:]  # (b, hq, i, w): memory tokens are no blocks
    if group_size is not None:
        scores = group_mean_spec(scores, group_size)  # (b, h, i, w)
    if stride == selection_block:
        return _softmax_with_sink_spec(scores)
    if interpolate:
        blocks = _interpolated_block_scores_spec(scores, stride, selection_block, causal)
    else:
        blocks = selection_block_scores_spec(scores, stride, selection_block)
    return block_probabilities_spec(blocks, selection_block)


def _softmax_with_sink_spec(scores: Tensor) -> Tensor:
    """Each row (..., w) softmaxed behind one extra logit of -1000, which is dropped."""
    rows = scores.reshape(-1, scores.shape[-1])
    out = torch.empty_like(rows)
    for r, row in enumerate(rows):
        out[r] = torch.cat((torch.tensor([SINK]), row)).softmax(-1)[1:]
    return out.reshape(scores.shape)


def _interpolated_block_scores_spec(
    scores: Tensor, stride: int, selection_block: int, hidden_after: bool
) -> Tensor:
    """(..., w) -> (..., w * stride // selection_block): token t sits at source coordinate
    (t + 0.5) / stride - 0.5 between two compressed scores (clamped to the ends) and takes
    their linear mix; with hidden_after, a hidden score (the masked logit) follows the
    last block. Each complete selection block averages its tokens."""
    w = scores.shape[-1]
    if w == 0:
        return scores
    ends = w + 1 if hidden_after else w
    hidden = torch.full_like(scores[..., :1], masked_logit(scores.dtype))
    source = torch.cat((scores, hidden), dim=-1) if hidden_after else scores
    tokens = []
    for t in range(w * stride):
        position = max((t + 0.5) / stride - 0.5, 0.0)
        left = min(int(position), ends - 1)
        right = min(left + 1, ends - 1)
        weight = position - left
        tokens.append(source[..., left] * (1 - weight) + source[..., right] * weight)
    tokens = torch.stack(tokens, dim=-1)  # (..., w * stride)
    num_blocks = w * stride // selection_block
    return torch.stack(
        [tokens[..., k * selection_block : (k + 1) * selection_block].mean(-1)
         for k in range(num_blocks)],
        dim=-1,
    ) if num_blocks else tokens[..., :0]  # fmt: skip


def _importance_with(
    logits, num_memory, stride, selection_block, group_size, interpolate, causal, *,
    keep_memory=False, reduction="mean", head_order="(h g)", from_probabilities=False,
    mask_when_equal=False, sink=True, interpolate_as=None, hidden_after=None,
):  # fmt: skip
    """The chain with the keyword's step done wrong (the package maps the blocks)."""
    from nsa_tutorial.importance import selection_block_scores

    if from_probabilities:
        logits = logits.softmax(dim=-1)
    scores = logits if keep_memory else logits[..., num_memory:]
    if group_size is not None:
        scores = reduce(scores, f"b {head_order} i j -> b h i j", reduction, g=group_size)
    if stride == selection_block and not mask_when_equal:
        return _softmax_with_sink_spec(scores) if sink else scores.softmax(dim=-1)
    if stride != selection_block:
        scores = selection_block_scores(
            scores, stride, selection_block,
            interpolate if interpolate_as is None else interpolate_as,
            causal if hidden_after is None else hidden_after,
        )  # fmt: skip
    return block_probabilities_spec(scores, selection_block)


def _importance_cases() -> list[Case]:
    from nsa_tutorial.compress import compressed_attention

    g = torch.Generator().manual_seed(33)

    def case(b, hq, hk, n, m, stride, block, group, interpolate, causal, loud=1.0, note=""):
        q = loud * torch.randn(b, hq, n, 8, generator=g)
        ck = torch.randn(b, hk, m + n // stride, 8, generator=g)
        _, logits = compressed_attention(q, ck, ck, m, stride, causal)
        args = (logits, m, stride, block, group, interpolate, causal)
        return Case(args, note=note)

    return [
        case(1, 4, 2, 29, 1, 4, 8, 2, False, True, note="a last, partial selection block"),
        case(1, 2, 2, 13, 2, 4, 4, None, False, True, note="stride = selection block"),
        case(2, 4, 2, 10, 1, 2, 2, 2, False, False, note="stride = selection block, not causal"),
        case(1, 4, 2, 27, 1, 4, 6, 2, True, True, note="6 is no multiple of the stride"),
        case(1, 4, 2, 50, 1, 16, 8, None, True, False, note="the stride is twice the block"),
        case(1, 4, 2, 21, 1, 2, 4, 2, False, True, loud=30.0, note="scores in the hundreds"),
    ]


IMPORTANCE_SCORES = Exercise(
    name="importance_scores",
    stage="03",
    hints=(
        (
            "logits is (b, hq, i, m + w): the compressed attention's scaled, masked scores, "
            "m memory columns first, then one per compressed block. With group_size g the "
            "output is (b, hq // g, i, blocks), one row per key/value head; with group_size "
            "None, (b, hq, i, blocks). blocks = w * stride // selection_block, or w when the "
            "stride equals the selection block."
        ),
        (
            "the rule, in the module's order: drop the memory columns; average the g "
            "consecutive query heads of each group (logits, not probabilities; a mean, not "
            "Eq. 10's sum); if stride == selection_block, stop there with the softmax behind "
            "the -1000 sink (no mapping, no own-block mask); otherwise map onto selection "
            "blocks (yours, or the package's with interpolate=True, hidden_after=causal) and "
            "finish with your block_probabilities."
        ),
        (
            "a skeleton:\n"
            "    scores = logits[..., ...:]\n"
            "    if group_size is not None:\n"
            '        scores = reduce(scores, "b (h g) i j -> ...", "mean", g=group_size)\n'
            "    if stride == selection_block:\n"
            "        sink = torch.full(..., -1e3)\n"
            "        return torch.cat(...).softmax(dim=-1)[..., 1:]\n"
            "    if interpolate:\n"
            "        scores = package_block_scores(..., interpolate=True, hidden_after=...)\n"
            "    else:\n"
            "        scores = selection_block_scores(...)\n"
            "    return block_probabilities(...)"
        ),
    ),
    spec=importance_scores_spec,
    make_cases=_importance_cases,
    mistakes=(
        Mistake(
            "the memory columns are still there: the first num_memory columns are memory "
            "tokens, not blocks; drop them first.",
            lambda *a: _importance_with(*a, keep_memory=True),
        ),
        Mistake(
            "this sums each group's logits (the paper's Eq. 10 sums probabilities); the "
            "reference averages the logits over the group.",
            lambda *a: _importance_with(*a, reduction="sum"),
        ),
        Mistake(
            "heads are grouped the wrong way: key/value head h owns the *consecutive* query "
            "heads h * g .. h * g + g - 1 (einops 'b (h g) i j').",
            lambda *a: _importance_with(*a, head_order="(g h)"),
        ),
        Mistake(
            "this starts from probabilities (a softmax over memory and blocks first, as the "
            "paper's Eq. 8); the reference starts from the logits, and the only softmax is the "
            "last one, with the sink.",
            lambda *a: _importance_with(*a, from_probabilities=True),
        ),
        Mistake(
            "when the stride equals the selection block, the reference neither maps nor hides "
            "the own block: compressed blocks already are selection blocks, and causal "
            "attention hid the rest. Only the softmax with the sink remains.",
            lambda *a: _importance_with(*a, mask_when_equal=True),
        ),
        Mistake(
            "the sink is missing when the stride equals the selection block: a query that "
            "sees no block must get all-zero importance, not a uniform spread over hidden blocks.",
            lambda *a: _importance_with(*a, sink=False),
        ),
        Mistake(
            "interpolate is ignored: with interpolate=True, map with the package's "
            "selection_block_scores(..., interpolate=True, hidden_after=causal).",
            lambda *a: _importance_with(*a, interpolate_as=False),
        ),
        Mistake(
            "with causal attention, interpolation leans the last block towards a hidden block "
            "after it (hidden_after=causal), so that a query's scores do not depend on how "
            "long the sequence is.",
            lambda *a: _importance_with(*a, hidden_after=False),
        ),
    ),
)

EXERCISES = [SELECTION_BLOCK_SCORES, BLOCK_PROBABILITIES, IMPORTANCE_SCORES]
