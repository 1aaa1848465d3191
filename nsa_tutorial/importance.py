"""Stage 03: importance scores for block selection (paper §3.3.2, Eq. 8-10).

The compressed attention already says how much each query cares about each
block; NSA reuses those numbers to pick blocks for fine attention. As in the
reference, the scores start from the compressed attention *logits* (not the
probabilities of Eq. 8), are averaged over the query heads that share a key/value
head (Eq. 10), mapped from compression blocks onto selection blocks (Eq. 9), and
turned into probabilities by a softmax with an extra "sink" column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce, repeat
from torch import Tensor

from nsa_tutorial.gqa import masked_logit

SINK_LOGIT = -1e3  # the reference's extra column: blocks far below it get probability ~0


def group_mean(scores: Tensor, group_size: int) -> Tensor:
    """Average over the query heads of each GQA group: (b, h * g, i, j) -> (b, h, i, j)."""
    return reduce(scores, "b (h g) i j -> b h i j", "mean", g=group_size)


def interpolation_points(w: int, length: int, device: torch.device | None = None):
    """Where `length` points resampled from w fall: (left, right, weight), each (length,).

    Output point t sits at source coordinate (t + 0.5) * w / length - 0.5 (pixel
    centres, as F.interpolate with align_corners=False), clamped to the ends: it is
    source[left] * (1 - weight) + source[right] * weight.
    """
    source = (torch.arange(length, device=device) + 0.5) * (w / length) - 0.5
    source = source.clamp(min=0)
    left = source.floor().long().clamp(max=w - 1)
    right = (left + 1).clamp(max=w - 1)
    return left, right, source - left


def interpolate_linear(scores: Tensor, length: int) -> Tensor:
    """Resample the last axis of scores (..., w) to `length` points, linearly."""
    left, right, weight = interpolation_points(scores.shape[-1], length, scores.device)
    weight = weight.to(scores.dtype)
    return scores[..., left] * (1 - weight) + scores[..., right] * weight


def token_scores(
    scores: Tensor, stride: int, interpolate: bool = False, hidden_after: bool = False
) -> Tensor:
    """Spread block scores (..., w) over the tokens they stand for -> (..., w * stride).

    Compressed block j is the newest information at tokens j * stride ..
    (j + 1) * stride - 1. Repeat its score there, or interpolate between neighbouring
    blocks' scores when `interpolate` is set. With `hidden_after` (causal), the last
    block interpolates towards a hidden block after it, as it would if the sequence
    went on: a query's scores then never depend on how long the sequence is.
    """
    w = scores.shape[-1]
    if not interpolate or w == 0:  # no block yet: nothing to interpolate between
        return repeat(scores, "... w -> ... (w l)", l=stride)
    if hidden_after:
        scores = F.pad(scores, (0, 1), value=masked_logit(scores.dtype))
    return interpolate_linear(scores, scores.shape[-1] * stride)[..., : w * stride]


def selection_block_scores(
    scores: Tensor,
    stride: int,
    selection_block: int,
    interpolate: bool = False,
    hidden_after: bool = False,
) -> Tensor:
    """Map compressed-block scores (..., w) onto selection blocks (..., w * stride // l').

    Each selection block of l' tokens gets the mean of its tokens' scores; a last,
    partial selection block is dropped (the sliding window covers it). With l' a
    multiple of the stride and no interpolation, this is the mean of the l' / stride
    compressed scores inside each selection block, as in the reference.
    """
    tokens = token_scores(scores, stride, interpolate, hidden_after)
    num_blocks = tokens.shape[-1] // selection_block
    tokens = tokens[..., : num_blocks * selection_block]
    return reduce(tokens, "... (w l) -> ... w", "mean", l=selection_block)


def mask_own_block(scores: Tensor, selection_block: int, first_query: int = 0) -> Tensor:
    """Hide each query's own selection block (..., i, w): fine attention always adds it.

    Rows are the queries first_query, first_query + 1, ...
    """
    queries = torch.arange(scores.shape[-2], device=scores.device) + first_query
    own = queries // selection_block
    blocks = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(own[:, None] == blocks[None, :], -torch.finfo(scores.dtype).max)


def softmax_with_sink(scores: Tensor) -> Tensor:
    """Softmax over blocks with an extra sink logit of -1000 that is then dropped.

    When every block is hidden, the sink takes all the probability and no block
    passes the selection threshold; otherwise it changes almost nothing.
    """
    padded = F.pad(scores, (1, 0), value=SINK_LOGIT)
    return padded.softmax(dim=-1)[..., 1:]


def block_probabilities(scores: Tensor, selection_block: int, first_query: int = 0) -> Tensor:
    """Selection-block scores (..., i, w) -> probabilities, each query's own block hidden."""
    return softmax_with_sink(mask_own_block(scores, selection_block, first_query))


def importance_scores(
    compressed_logits: Tensor,
    num_memory: int,
    stride: int,
    selection_block: int,
    group_size: int | None,
    interpolate: bool = False,
    causal: bool = False,
    first_query: int = 0,
) -> Tensor:
    """Selection-block probabilities from compressed attention logits (b, hq, i, m + w).

    group_size: heads per key/value head to average over (query_heads_share_selected_kv),
    or None to keep one score per query head. When the stride equals the selection
    block, compressed blocks already are selection blocks and pass unchanged (a
    query's own block is then hidden by the causal rule, not by a mask, as in the
    reference). Rows are the queries first_query, first_query + 1, ...; `causal`
    only changes interpolation (see token_scores). Returns (b, h, i, blocks).
    """
    scores = compressed_logits[..., num_memory:]  # memory tokens are not blocks
    if group_size is not None:
        scores = group_mean(scores, group_size)
    if stride != selection_block:
        scores = selection_block_scores(scores, stride, selection_block, interpolate, causal)
        return block_probabilities(scores, selection_block, first_query)
    return softmax_with_sink(scores)
