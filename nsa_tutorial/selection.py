"""Stage 04: block selection and fine attention (paper §3.3.2, Eq. 11-12).

Each query keeps the top-n selection blocks by importance and attends, at full
resolution, to their keys plus (when causal) its own block up to itself: the
block-causal diagonal of the paper's Fig. 2. Two ways compute the same thing:

- gathered: copy each query's n blocks next to it, cost n * l' per query, the real
  sparsity (and what the Triton kernel of notebook 08 does, without the copies);
- dense: a (T, T) boolean mask over ordinary attention, simple but T^2.

`fine_attention` picks between them by sequence length (notebook 04 measures why).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce, repeat
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from nsa_tutorial.attend import attend

SELECTED_THRESHOLD = 1e-10  # blocks with importance at or below this are not attended
DENSE_MAX_SEQ_LEN = 32768  # dense up to here: benchmarks/fine_attention_cpu.py, notebook 04


def top_blocks(importance: Tensor, num_selected: int) -> tuple[Tensor, Tensor]:
    """Top-n blocks per query from importance (b, h, i, w): (values, indices), (b, h, i, n').

    n' = min(num_selected, w): early queries cannot pick more blocks than exist.
    """
    n = min(num_selected, importance.shape[-1])
    return importance.topk(n, dim=-1)


def straight_through_gates(values: Tensor) -> Tensor:
    """Gates that are 1 in the forward pass but pass gradients to the importance values.

    With `use_diff_topk`, selected keys are multiplied by these, so the importance
    scores (and the compression MLP behind them) learn from the fine branch.
    """
    return values + (1.0 - values).detach()


def _pad_rows(x: Tensor, rows: int, value: float | bool = 0) -> Tensor:
    """Pad axis -2 of x with `rows` rows of `value`."""
    return F.pad(x, (0, 0, 0, rows), value=value)


def past_blocks_only(indices: Tensor, selected: Tensor, block: int, first_query: int = 0) -> Tensor:
    """When causal, a selected block counts only if it ends before the query's own block.

    Importance already gives the own and later blocks ~0, so this changes nothing in
    the module; it keeps both fine-attention paths causal and equal for any indices.
    """
    own = _query_positions(indices, first_query)[:, None] // block  # (i, 1)
    return selected & (indices < own)


def _query_positions(indices: Tensor, first_query: int) -> Tensor:
    """Positions of the queries whose rows `indices` (b, h, i, s) holds."""
    return torch.arange(indices.shape[-2], device=indices.device) + first_query


def gather_blocks(x: Tensor, indices: Tensor, block: int) -> Tensor:
    """Each query's blocks of x (b, hk, n, d) -> (b, h, i, s, block, d).

    indices (b, h, i, s) index blocks of `block` tokens (the last one zero-padded);
    h may be a multiple of hk (one selection per query head): heads are then shared
    as in GQA.
    """
    x = _pad_rows(x, -x.shape[-2] % block)
    blocks = rearrange(x, "b h (w l) d -> b h w l d", l=block)
    blocks = repeat(blocks, "b h w l d -> b (h g) w l d", g=indices.shape[1] // x.shape[1])
    batch = torch.arange(indices.shape[0], device=x.device)[:, None, None, None]
    heads = torch.arange(indices.shape[1], device=x.device)[None, :, None, None]
    return blocks[batch, heads, indices]


def fine_attention_gathered(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    selected: Tensor,
    block: int,
    causal: bool,
    gates: Tensor | None = None,
    scale: float | None = None,
    first_query: int = 0,
) -> Tensor:
    """Fine attention by gathering: q (b, hq, i, d), k and v (b, hk, n, d) -> (b, hq, i, d).

    indices, selected, gates: (b, h, n, s) with h = hk (shared selection) or hq.
    Query i attends to the keys of its selected blocks (where `selected`; when causal,
    only blocks before its own) and, if causal, to keys j <= i of its own block.
    Selected keys are scaled by `gates`. q's rows are the queries first_query, ...
    (all n of them by default; a decoding step has one).
    """
    n, h = k.shape[-2], indices.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal:
        selected = past_blocks_only(indices, selected, block, first_query)
    key_visible = repeat(selected, "b h i s -> b h i s l", l=block)
    if causal:
        queries = torch.arange(q.shape[-2], device=q.device) + first_query
        own = repeat(queries // block, "i -> b h i 1", b=q.shape[0], h=h)
        indices = torch.cat((indices, own), dim=-1)
        in_block = queries % block
        diagonal = in_block[:, None] >= torch.arange(block, device=q.device)[None, :]  # (i, l)
        key_visible = torch.cat(
            (key_visible, diagonal[:, None].expand_as(key_visible[..., :1, :])), -2
        )
        gates = None if gates is None else F.pad(gates, (0, 1), value=1.0)
    key_position = indices[..., None] * block + torch.arange(block, device=q.device)
    key_visible = key_visible & (key_position < n)  # the zero padding is never a key
    fk, fv = gather_blocks(k, indices, block), gather_blocks(v, indices, block)
    if gates is not None:
        fk = fk * gates[..., None, None]
    fk, fv = (rearrange(t, "b h i s l d -> b h i (s l) d") for t in (fk, fv))
    key_visible = rearrange(key_visible, "b h i s l -> b h 1 i (s l)")
    fq = rearrange(q, "b (h g) i d -> b h g i d", h=h)
    logits = einsum(fq, fk, "b h g i d, b h i j d -> b h g i j") * scale
    logits = logits.masked_fill(~key_visible, -torch.finfo(logits.dtype).max)
    out = einsum(logits.softmax(dim=-1), fv, "b h g i j, b h i j d -> b h g i d")
    return rearrange(out, "b h g i d -> b (h g) i d")


def fine_mask(
    indices: Tensor,
    selected: Tensor,
    seq_len: int,
    block: int,
    causal: bool,
    first_query: int = 0,
    num_keys: int | None = None,
) -> Tensor:
    """The same visibility as a dense mask (b, h, i, j): may query i see key j?

    Rows are the queries first_query, first_query + 1, ... of a sequence of seq_len
    tokens; columns its first num_keys keys (all by default).
    """
    if causal:
        selected = past_blocks_only(indices, selected, block, first_query)
    num_blocks = math.ceil(seq_len / block)
    chosen = torch.zeros(*indices.shape[:-1], num_blocks, dtype=torch.bool, device=indices.device)
    chosen = chosen.scatter(-1, indices, selected)  # (b, h, i, w)
    keys = torch.arange(seq_len if num_keys is None else num_keys, device=indices.device)
    mask = chosen[..., keys // block]  # (b, h, i, j)
    if causal:
        queries = _query_positions(indices, first_query)[:, None]
        diagonal = (queries // block == keys // block) & (queries >= keys)
        mask = mask | diagonal
    return mask


def fine_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    selected: Tensor,
    block: int,
    causal: bool,
    gates: Tensor | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> Tensor:
    """Fine attention through a dense mask; same arguments and result as gathered.

    Queries go `chunk` at a time so that the mask and scores stay (chunk, n); when
    causal, a chunk only looks at the keys up to its last query (half the work).
    """
    n = q.shape[-2]
    out = torch.cat(
        [
            fine_attention_rows(
                q[..., start : start + chunk, :],
                k,
                v,
                indices[..., start : start + chunk, :],
                selected[..., start : start + chunk, :],
                block,
                causal,
                start,
                None if gates is None else gates[..., start : start + chunk, :],
                scale,
            )
            for start in range(0, n, chunk)
        ],
        dim=-2,
    )
    return _fill_queries_that_see_nothing(out, v, indices, selected, block, causal)


def fine_attention_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    selected: Tensor,
    block: int,
    causal: bool,
    first_query: int,
    gates: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Fine attention of the queries first_query, first_query + 1, ... (q's rows) over
    the keys k, v (b, hk, n, d) of the sequence so far, through a dense mask.

    A decoding step is one row; `fine_attention_dense` runs the rows chunk by chunk.
    """
    n, h = k.shape[-2], indices.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal:
        selected = past_blocks_only(indices, selected, block, first_query)
    keys = first_query + q.shape[-2] if causal else n
    k, v = k[..., :keys, :], v[..., :keys, :]  # views: no copy
    if h != k.shape[1]:  # one selection per query head: each reads its group's keys
        k, v = (repeat(t, "b hk j d -> b (hk g) j d", g=h // t.shape[1]) for t in (k, v))
    mask = fine_mask(indices, selected, n, block, causal, first_query, keys)  # (b, h, i, j)
    fq = rearrange(q, "b (h g) i d -> b h g i d", h=h)
    logits = einsum(fq, k, "b h g i d, b h j d -> b h g i j") * scale
    if gates is not None:
        # only selected blocks are gated: a query's own block keeps a constant 1
        block_gates = torch.ones(
            *indices.shape[:-1], math.ceil(n / block), dtype=gates.dtype, device=q.device
        )
        block_gates = block_gates.scatter(-1, indices, torch.where(selected, gates, 1.0))
        key_block = torch.arange(keys, device=q.device) // block
        logits = logits * block_gates[..., key_block][:, :, None]
    logits = logits.masked_fill(~mask[:, :, None], -torch.finfo(logits.dtype).max)
    out = einsum(logits.softmax(dim=-1), v, "b h g i j, b h j d -> b h g i d")
    return rearrange(out, "b h g i d -> b (h g) i d")


def fine_selection_flex_mask(
    seq_len: int, block: int, causal: bool
) -> Callable[[Tensor, Tensor, int], BlockMask]:
    """A builder for SparseAttention's `fine_selection_flex_mask` argument.

    The module calls it with each query's block indices and selected flags
    (b, h, n, s) and the number of query heads per selection head; it returns the
    flex-attention BlockMask of the same visibility as `fine_mask`.
    """

    def build(indices: Tensor, selected: Tensor, num_grouped_queries: int) -> BlockMask:
        if indices.shape[-2] != seq_len:
            raise ValueError(
                f"fine_selection_flex_mask was built for {seq_len} tokens, "
                f"but the sequence has {indices.shape[-2]}"
            )
        if causal:
            selected = past_blocks_only(indices, selected, block)
        num_blocks = math.ceil(seq_len / block)
        chosen = torch.zeros(
            *indices.shape[:-1], num_blocks, dtype=torch.bool, device=indices.device
        )
        chosen = chosen.scatter(-1, indices, selected)  # (b, h, n, w)

        def visible(batch, head, query, key):
            picked = chosen[batch, head // num_grouped_queries, query, key // block]
            if not causal:
                return picked
            return (query >= key) & ((query // block == key // block) | picked)

        heads = indices.shape[1] * num_grouped_queries
        return create_block_mask(
            visible, indices.shape[0], heads, seq_len, seq_len, device=indices.device
        )

    return build


def fine_attention_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    selected: Tensor,
    block: int,
    causal: bool,
    block_mask: BlockMask,
    scale: float | None = None,
) -> Tensor:
    """Fine attention through flex attention; the same result as the other two paths."""
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return _fill_queries_that_see_nothing(out, v, indices, selected, block, causal)


def _fill_queries_that_see_nothing(
    out: Tensor, v: Tensor, indices: Tensor, selected: Tensor, block: int, causal: bool
) -> Tensor:
    """Give a query with no selected block (only possible when not causal) what the
    gathered softmax over all-hidden keys gives it: the plain mean of the values of its
    s chosen blocks, block * s slots (zero padding included)."""
    if causal:
        return out  # every query sees at least itself
    v = _pad_rows(v, -v.shape[-2] % block)
    sums = reduce(v, "b h (w l) d -> b h w d", "sum", l=block)  # one row per block
    mean = gather_blocks(sums, indices, 1).sum(dim=(-3, -2)) / (indices.shape[-1] * block)
    group = out.shape[1] // indices.shape[1]
    sees_nothing = repeat(~selected.any(dim=-1), "b h i -> b (h g) i 1", g=group)
    return torch.where(sees_nothing, repeat(mean, "b h i d -> b (h g) i d", g=group), out)


def block_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, block: int, causal: bool, scale: float | None = None
) -> Tensor:
    """Fine attention with no selected blocks: each query sees only its own block.

    Causal: keys j <= i of the block. Not causal: the whole block, including the zero
    padding of a last partial block, exactly as the reference computes it.
    """
    batch, n = q.shape[0], q.shape[-2]
    q, k, v = (_pad_rows(t, -n % block) for t in (q, k, v))
    q, k, v = (rearrange(t, "b h (w l) d -> (b w) h l d", l=block) for t in (q, k, v))
    mask = torch.ones(block, block, dtype=torch.bool, device=q.device).tril() if causal else None
    out, _ = attend(q, k, v, mask=mask, scale=scale)
    return rearrange(out, "(b w) h l d -> b h (w l) d", b=batch)[..., :n, :]


def selection_attention_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    importance: Tensor,
    num_selected: int,
    block: int,
    first_query: int,
    diff_topk: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The causal selection branch for the queries first_query, ... (q's rows) over the
    keys k, v of the sequence so far: a decoding step. Same rules as selection_attention;
    gathering, so a step reads n * l' keys however long the sequence is."""
    values, indices = top_blocks(importance, num_selected)
    if indices.shape[-1] == 0:  # only the own block, up to each query
        own_start = first_query // block * block
        rows = torch.arange(q.shape[-2], device=q.device) + first_query
        keys = torch.arange(own_start, k.shape[-2], device=q.device)
        mask = (keys[None, :] <= rows[:, None]) & (keys[None, :] // block == rows[:, None] // block)
        out, _ = attend(q, k[..., own_start:, :], v[..., own_start:, :], mask=mask, scale=scale)
        return out
    gates = straight_through_gates(values) if diff_topk else None
    selected = values > SELECTED_THRESHOLD
    return fine_attention_gathered(
        q, k, v, indices, selected, block, True, gates, scale, first_query
    )


def selection_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    importance: Tensor,
    num_selected: int,
    block: int,
    causal: bool,
    diff_topk: bool = False,
    scale: float | None = None,
    flex_mask: Callable[[Tensor, Tensor, int], BlockMask] | None = None,
    use_triton: bool = False,
) -> Tensor:
    """The selection branch: pick the top-n blocks by importance (b, h, n, w) and attend.

    With no block to pick (num_selected 0, or no complete block yet), each query
    attends to its own block only. Blocks whose importance is <= 1e-10 are skipped.
    `use_triton` computes it with the Triton kernel of notebooks 08-09; otherwise
    `flex_mask`, a builder from `fine_selection_flex_mask`, with flex attention.
    """
    values, indices = top_blocks(importance, num_selected)
    if indices.shape[-1] == 0:
        return block_causal_attention(q, k, v, block, causal, scale)
    selected = values > SELECTED_THRESHOLD
    gates = straight_through_gates(values) if diff_topk else None
    if use_triton:  # imported here: the rest of the package works without Triton
        from nsa_tutorial.kernels.selection import selection_attention as selection_kernel

        out = selection_kernel(
            q, k, v, indices, selected, block,
            sel_scale=gates, include_block_causal=causal, scale=scale, check_indices=False,
        )  # fmt: skip
        return _fill_queries_that_see_nothing(out, v, indices, selected, block, causal)
    if flex_mask is not None:
        if diff_topk:
            raise ValueError(
                "fine_selection_flex_mask cannot be combined with use_diff_topk=True: flex "
                "attention has no way to scale the selected keys by the gates"
            )
        block_mask = flex_mask(indices, selected, q.shape[1] // indices.shape[1])
        return fine_attention_flex(q, k, v, indices, selected, block, causal, block_mask, scale)
    dense = q.shape[-2] <= DENSE_MAX_SEQ_LEN
    attention = fine_attention_dense if dense else fine_attention_gathered
    return attention(q, k, v, indices, selected, block, causal, gates, scale)
