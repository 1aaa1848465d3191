"""Stage 10: importance scores and top-n blocks without an (n, w) tensor of logits.

Notebook 03 computes importance from the compressed attention logits: n x w scores per
query head (64k tokens, stride 16: 4k per query), averaged over the GQA group, mapped
onto selection blocks, masked, softmaxed. Every step before the mask is linear:

    group mean of q_g . ck_c        = (group mean of q_g) . ck_c
    sum_c W[c, j] (q . ck_c)        = q . (sum_c W[c, j] ck_c)

so the selection-block scores are one small product, q_bar (n, d) against
W-weighted keys (w', d) with w' = n / l' selection blocks, a quarter of w at the
paper's sizes and shared by the group. A selection block whose weights touch a
compressed block the query may not see, or the query's own block, gets probability 0,
exactly as the masked logits give it. Queries go `chunk` at a time, so the largest
tensor is (chunk, w') per head; top-n is taken chunk by chunk.
"""

from __future__ import annotations

import functools

import torch
from einops import einsum, rearrange
from torch import Tensor

from nsa_tutorial.importance import SINK_LOGIT, interpolation_points

QUERY_CHUNK = 8192  # queries per step: (chunk, w') scores per head at a time


def selection_block_weights(
    num_blocks: int, stride: int, selection_block: int, interpolate: bool, hidden_after: bool
) -> Tensor:
    """The linear map of `selection_block_scores` as a matrix (w + 1, w').

    Entry (c, j) is the weight of compressed block c in selection block j; row w stands
    for the hidden block after the last one that interpolation leans towards when
    causal (`token_scores`' hidden_after). Built token by token, O(n): each token of a
    complete selection block adds 1 / l' of its score's sources.
    """
    num_selection = num_blocks * stride // selection_block
    tokens = torch.arange(num_selection * selection_block)
    if not interpolate or num_blocks == 0:
        sources = [(tokens // stride, torch.ones(len(tokens)))]
    else:
        width = num_blocks + 1 if hidden_after else num_blocks
        left, right, share = interpolation_points(width, width * stride)
        sources = [(left[tokens], 1 - share[tokens]), (right[tokens], share[tokens])]
    weights = torch.zeros(num_blocks + 1, num_selection)
    for block, share in sources:
        weights.index_put_((block, tokens // selection_block), share / selection_block, True)
    return weights


def first_visible_query(weights: Tensor, stride: int, causal: bool) -> Tensor:
    """(w',) long: the first query that sees every compressed block selection block j
    reads (its last one must end strictly before the query); never for a block that
    reads the hidden block after the last."""
    num_blocks = weights.shape[0] - 1
    if not causal:
        return torch.zeros(weights.shape[1], dtype=torch.long)
    blocks = torch.arange(num_blocks + 1)[:, None].expand_as(weights)
    last = torch.where(weights != 0, blocks, -1).amax(dim=0)  # (w',)
    first = (last + 1) * stride  # block c ends at (c + 1) * stride - 1
    never = torch.iinfo(torch.long).max
    return torch.where(last == num_blocks, never, first)


def top_blocks_from_keys(
    q: Tensor, ck: Tensor, *, num_selected: int, stride: int, selection_block: int,
    group_size: int | None, interpolate: bool, causal: bool, scale: float,
    chunk: int = QUERY_CHUNK,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Each query's top-n blocks: (values, indices) (b, h, n, s), as `top_blocks` of
    `importance_scores` gives them, from q (b, hq, n, d) and the compressed keys ck
    (b, hk, w, d) without memory tokens.

    group_size: query heads per key/value head to average (shared selection), or None
    for one selection per query head. Differentiable (the diff-topk gates need it).
    """
    weights, first_query = _block_map(
        ck.shape[-2], stride, selection_block, interpolate, causal, q.device
    )
    # scores in float32 whatever the model's dtype: top-n ranks them
    block_keys = einsum(weights, ck.float(), "c w, b h c d -> b h w d") * scale  # (b, hk, w', d)
    if group_size is None:  # one selection per query head: each reads its group's keys
        block_keys = block_keys.repeat_interleave(q.shape[1] // ck.shape[1], dim=1)
    values, indices = [], []
    for start in range(0, q.shape[-2], chunk):
        rows = q[..., start : start + chunk, :]  # (b, hq, i, d): a chunk at a time
        if group_size is not None:  # the mean is taken in float32, casting as it reads
            rows = rearrange(rows, "b (h g) i d -> b h g i d", g=group_size)
            rows = rows.mean(dim=2, dtype=torch.float32)
        scores = einsum(rows.float(), block_keys, "b h i d, b h w d -> b h i w")
        hidden = _hidden_blocks(start, scores.shape[-2], first_query, selection_block, stride)
        # hidden blocks rank last and get probability 0 (finite, so that a row with every
        # block hidden still has a finite log-sum-exp and gradient)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        # softmax with the sink column, for the top n only: exp(score - log-sum-exp)
        total = torch.logaddexp(scores.logsumexp(dim=-1), scores.new_tensor(SINK_LOGIT))
        top = scores.topk(min(num_selected, scores.shape[-1]), dim=-1)
        values.append((top.values - total[..., None]).exp())
        indices.append(top.indices)
    return torch.cat(values, dim=-2), torch.cat(indices, dim=-2)


@functools.lru_cache(maxsize=16)
def _block_map(
    num_blocks: int, stride: int, selection_block: int, interpolate: bool, causal: bool,
    device: torch.device,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The weights (w, w') on `device` and each selection block's first query (w',), made
    once per length and configuration (when stride = l', the weights are the identity)."""
    weights = selection_block_weights(
        num_blocks, stride, selection_block, interpolate and stride != selection_block, causal
    )
    first_query = first_visible_query(weights, stride, causal)
    return weights[:num_blocks].to(device), first_query.to(device)


def _hidden_blocks(
    start: int, rows: int, first_query: Tensor, selection_block: int, stride: int
) -> Tensor:
    """(i, w') bool for the queries start .. start + rows - 1: blocks not yet complete and
    (when the blocks were remapped) the query's own block, which fine attention reads."""
    queries = torch.arange(start, start + rows, device=first_query.device)[:, None]
    hidden = queries < first_query
    if stride != selection_block:
        own = torch.arange(len(first_query), device=first_query.device)
        hidden = hidden | (queries // selection_block == own)
    return hidden
