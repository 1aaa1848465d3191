"""Stage 04, second half: fine attention over given blocks (paper §3.3.2, Eq. 12, Fig. 2).

Query i attends, at full resolution, to the keys of its selected blocks and (when
causal) to its own block up to itself: the block-causal diagonal. Every path here
computes exactly that, with one signature:

    path(q, k, v, indices, selected, *, block_size, causal, gates=None, scale=None,
         first_query=0)

- q (b, hq, i, d): the queries first_query, first_query + 1, ... (all n by default;
  a decoding step has one); k, v (b, hk, n, d): the keys and values so far;
- indices, selected, gates (b, h, i, s), h = hk (selection shared by a GQA group) or
  hq: each query's s blocks, whether each is read, and the diff-topk gate that
  multiplies its keys.

The paths:

- `fine_attention_gathered`: copy each query's blocks next to it; n * l' keys per
  query, the real sparsity (the Triton kernel does this without the copies);
- `fine_attention_dense`: a dense (query, key) mask, queries in chunks; T^2 work;
- `fine_attention_flex`: flex attention with a BlockMask from `fine_selection_flex_mask`;
- `fine_attention_triton`: the Triton kernel of notebooks 08-09.

`fine_attention` picks one (notebook 04 measures why) and is what the selection
branch calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce, repeat
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from nsa_tutorial.gqa import attend

DENSE_MAX_SEQ_LEN = 32768  # dense up to here: benchmarks/fine_attention_cpu.py, notebook 04
FlexMaskBuilder = Callable[[Tensor, Tensor, int], BlockMask]


def _pad_rows(x: Tensor, rows: int, value: float | bool = 0) -> Tensor:
    """Pad axis -2 of x with `rows` rows of `value`."""
    return F.pad(x, (0, 0, 0, rows), value=value)


def _query_positions(rows: int, first_query: int, device: torch.device) -> Tensor:
    """Positions (i,) of the queries first_query, first_query + 1, ..."""
    return torch.arange(rows, device=device) + first_query


def past_blocks_only(
    indices: Tensor, selected: Tensor, block_size: int, first_query: int = 0
) -> Tensor:
    """When causal, a selected block counts only if it ends before the query's own block.

    Importance already gives the own and later blocks ~0, so this changes nothing in
    the module; it keeps every path causal and equal for any indices.
    """
    queries = _query_positions(indices.shape[-2], first_query, indices.device)
    return selected & (indices < (queries // block_size)[:, None])


def gather_blocks(x: Tensor, indices: Tensor, block_size: int) -> Tensor:
    """Each query's blocks of x (b, hk, n, d) -> (b, h, i, s, l, d), l = block_size.

    indices (b, h, i, s) index blocks of l tokens (the last one zero-padded); h may be
    a multiple of hk (one selection per query head): heads are then shared as in GQA.
    """
    x = _pad_rows(x, -x.shape[-2] % block_size)
    blocks = rearrange(x, "b h (w l) d -> b h w l d", l=block_size)
    blocks = repeat(blocks, "b h w l d -> b (h g) w l d", g=indices.shape[1] // x.shape[1])
    batch = torch.arange(indices.shape[0], device=x.device)[:, None, None, None]
    heads = torch.arange(indices.shape[1], device=x.device)[None, :, None, None]
    return blocks[batch, heads, indices]


def fine_mask(
    indices: Tensor,
    selected: Tensor,
    *,
    seq_len: int,
    block_size: int,
    causal: bool,
    first_query: int = 0,
    num_keys: int | None = None,
) -> Tensor:
    """The visibility as a dense mask (b, h, i, j): may query i see key j?

    Rows are the queries first_query, first_query + 1, ... of a sequence of seq_len
    tokens; columns its first num_keys keys (all by default).
    """
    if causal:
        selected = past_blocks_only(indices, selected, block_size, first_query)
    num_blocks = math.ceil(seq_len / block_size)
    chosen = torch.zeros(*indices.shape[:-1], num_blocks, dtype=torch.bool, device=indices.device)
    chosen = chosen.scatter(-1, indices, selected)  # (b, h, i, w)
    keys = torch.arange(seq_len if num_keys is None else num_keys, device=indices.device)
    mask = chosen[..., keys // block_size]  # (b, h, i, j)
    if causal:
        queries = _query_positions(indices.shape[-2], first_query, indices.device)[:, None]
        mask = mask | ((queries // block_size == keys // block_size) & (queries >= keys))
    return mask


def fine_attention_gathered(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool, gates: Tensor | None = None, scale: float | None = None, first_query: int = 0,
) -> Tensor:  # fmt: skip
    """Fine attention by gathering each query's blocks: -> (b, hq, i, d).

    Memory grows as i * (s + 1) * l; the reference path, readable next to Eq. 12.
    """
    n, h = k.shape[-2], indices.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal:
        selected = past_blocks_only(indices, selected, block_size, first_query)
    key_visible = repeat(selected, "b h i s -> b h i s l", l=block_size)
    if causal:  # the own block as one more slot, visible up to the query itself
        queries = _query_positions(q.shape[-2], first_query, q.device)
        own = repeat(queries // block_size, "i -> b h i 1", b=q.shape[0], h=h)
        indices = torch.cat((indices, own), dim=-1)
        in_block = torch.arange(block_size, device=q.device)
        diagonal = (queries % block_size)[:, None] >= in_block  # (i, l)
        diagonal = repeat(diagonal, "i l -> b h i 1 l", b=q.shape[0], h=h)
        key_visible = torch.cat((key_visible, diagonal), dim=-2)
        gates = None if gates is None else F.pad(gates, (0, 1), value=1.0)
    key_position = indices[..., None] * block_size + torch.arange(block_size, device=q.device)
    key_visible = key_visible & (key_position < n)  # the zero padding is never a key
    fk, fv = gather_blocks(k, indices, block_size), gather_blocks(v, indices, block_size)
    if gates is not None:
        fk = fk * gates[..., None, None]
    fk, fv = (rearrange(t, "b h i s l d -> b h i (s l) d") for t in (fk, fv))
    key_visible = rearrange(key_visible, "b h i s l -> b h 1 i (s l)")
    fq = rearrange(q, "b (h g) i d -> b h g i d", h=h)
    logits = einsum(fq, fk, "b h g i d, b h i j d -> b h g i j") * scale
    logits = logits.masked_fill(~key_visible, -torch.finfo(logits.dtype).max)
    out = einsum(logits.softmax(dim=-1), fv, "b h g i j, b h i j d -> b h g i d")
    return rearrange(out, "b h g i d -> b (h g) i d")


def fine_attention_dense(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool, gates: Tensor | None = None, scale: float | None = None, first_query: int = 0,
    chunk: int = 256,
) -> Tensor:  # fmt: skip
    """Fine attention through a dense mask, `chunk` queries at a time: -> (b, hq, i, d).

    The mask and scores of a chunk are (chunk, keys); when causal, a chunk reads only
    the keys up to its last query (half the work of T^2).
    """
    out = torch.cat(
        [
            _dense_rows(
                q[..., start : start + chunk, :],
                k,
                v,
                indices[..., start : start + chunk, :],
                selected[..., start : start + chunk, :],
                None if gates is None else gates[..., start : start + chunk, :],
                block_size=block_size,
                causal=causal,
                scale=scale,
                first_query=first_query + start,
            )
            for start in range(0, q.shape[-2], chunk)
        ],
        dim=-2,
    )
    return fill_queries_that_see_nothing(
        out, v, indices, selected, block_size=block_size, causal=causal
    )


def _dense_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    selected: Tensor,
    gates: Tensor | None,
    *,
    block_size: int,
    causal: bool,
    scale: float | None,
    first_query: int,
) -> Tensor:
    """One chunk of `fine_attention_dense`: the queries first_query, ... (q's rows)."""
    n, h = k.shape[-2], indices.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if causal:  # before gating too: a selected own block keeps its gate of 1
        selected = past_blocks_only(indices, selected, block_size, first_query)
    keys = first_query + q.shape[-2] if causal else n
    k, v = k[..., :keys, :], v[..., :keys, :]  # views: no copy
    if h != k.shape[1]:  # one selection per query head: each reads its group's keys
        k, v = (repeat(t, "b hk j d -> b (hk g) j d", g=h // t.shape[1]) for t in (k, v))
    mask = fine_mask(
        indices, selected, seq_len=n, block_size=block_size, causal=causal,
        first_query=first_query, num_keys=keys,
    )  # (b, h, i, j)  # fmt: skip
    fq = rearrange(q, "b (h g) i d -> b h g i d", h=h)
    logits = einsum(fq, k, "b h g i d, b h j d -> b h g i j") * scale
    if gates is not None:
        logits = logits * _key_gates(indices, selected, gates, block_size, n, keys)[:, :, None]
    logits = logits.masked_fill(~mask[:, :, None], -torch.finfo(logits.dtype).max)
    out = einsum(logits.softmax(dim=-1), v, "b h g i j, b h j d -> b h g i d")
    return rearrange(out, "b h g i d -> b (h g) i d")


def _key_gates(
    indices: Tensor, selected: Tensor, gates: Tensor, block_size: int, n: int, keys: int
) -> Tensor:
    """Each key's gate (b, h, i, j): its block's gate where selected, 1 elsewhere (the
    own block keeps a constant 1)."""
    block_gates = torch.ones(
        *indices.shape[:-1], math.ceil(n / block_size), dtype=gates.dtype, device=gates.device
    )
    block_gates = block_gates.scatter(-1, indices, torch.where(selected, gates, 1.0))
    return block_gates[..., torch.arange(keys, device=gates.device) // block_size]


def fine_selection_flex_mask(seq_len: int, block_size: int, causal: bool) -> FlexMaskBuilder:
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
            selected = past_blocks_only(indices, selected, block_size)
        num_blocks = math.ceil(seq_len / block_size)
        chosen = torch.zeros(
            *indices.shape[:-1], num_blocks, dtype=torch.bool, device=indices.device
        )
        chosen = chosen.scatter(-1, indices, selected)  # (b, h, n, w)

        def visible(batch, head, query, key):
            picked = chosen[batch, head // num_grouped_queries, query, key // block_size]
            if not causal:
                return picked
            return (query >= key) & ((query // block_size == key // block_size) | picked)

        heads = indices.shape[1] * num_grouped_queries
        return create_block_mask(
            visible, indices.shape[0], heads, seq_len, seq_len, device=indices.device
        )

    return build


def fine_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool, gates: Tensor | None = None, scale: float | None = None, first_query: int = 0,
    flex_mask: FlexMaskBuilder,
) -> Tensor:  # fmt: skip
    """Fine attention through flex attention, the mask from `flex_mask`, a builder made
    by `fine_selection_flex_mask` for this length. Whole sequences only, no gates."""
    if gates is not None:
        raise ValueError(
            "fine_selection_flex_mask cannot be combined with use_diff_topk=True: flex "
            "attention has no way to scale the selected keys by the gates"
        )
    _require_whole_sequence("fine_attention_flex", first_query)
    block_mask = flex_mask(indices, selected, q.shape[1] // indices.shape[1])
    out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return fill_queries_that_see_nothing(
        out, v, indices, selected, block_size=block_size, causal=causal
    )


def fine_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool, gates: Tensor | None = None, scale: float | None = None, first_query: int = 0,
) -> Tensor:  # fmt: skip
    """Fine attention by the Triton kernel of notebooks 08-09. Whole sequences only.

    Top-k indices are in range by construction, so the kernel's range check (which
    waits for the GPU) is skipped.
    """
    _require_whole_sequence("fine_attention_triton", first_query)
    from nsa_tutorial.kernels.selection import selection_attention  # needs Triton

    out = selection_attention(
        q, k, v, indices, selected,
        block_size=block_size, causal=causal, gates=gates, scale=scale, check_indices=False,
    )  # fmt: skip
    return fill_queries_that_see_nothing(
        out, v, indices, selected, block_size=block_size, causal=causal
    )


def _require_whole_sequence(path: str, first_query: int) -> None:
    if first_query:
        raise ValueError(
            f"{path} computes whole sequences: first_query must be 0, got "
            f"first_query={first_query}; decoding steps take fine_attention_gathered"
        )


def fill_queries_that_see_nothing(
    out: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int, causal: bool
) -> Tensor:
    """Reproduce the reference for a query that sees no key (not causal, nothing selected).

    This is the one place that copies that behaviour: the reference's softmax over
    all-hidden keys gives equal weights to its s gathered blocks, so such a query gets
    the plain mean of their s * l slots, zero padding included. The gathered path gets
    it by itself; the dense, flex and Triton paths call this.
    """
    if causal:
        return out  # every query sees at least itself
    v = _pad_rows(v, -v.shape[-2] % block_size)
    sums = reduce(v, "b h (w l) d -> b h w d", "sum", l=block_size)  # one row per block
    mean = gather_blocks(sums, indices, 1).sum(dim=(-3, -2)) / (indices.shape[-1] * block_size)
    group = out.shape[1] // indices.shape[1]
    sees_nothing = repeat(~selected.any(dim=-1), "b h i -> b (h g) i 1", g=group)
    return torch.where(sees_nothing, repeat(mean, "b h i d -> b (h g) i d", g=group), out)


def own_block_attention(
    q: Tensor, k: Tensor, v: Tensor, *, block_size: int, causal: bool, scale: float | None = None
) -> Tensor:
    """Fine attention when no block can be selected: each query sees only its own block.

    Causal: keys j <= i of the block. Not causal: the whole block, including the zero
    padding of a last partial block, exactly as the reference computes it.
    """
    batch, n = q.shape[0], q.shape[-2]
    q, k, v = (_pad_rows(t, -n % block_size) for t in (q, k, v))
    q, k, v = (rearrange(t, "b h (w l) d -> (b w) h l d", l=block_size) for t in (q, k, v))
    mask = None
    if causal:
        mask = torch.ones(block_size, block_size, dtype=torch.bool, device=q.device).tril()
    out, _ = attend(q, k, v, mask=mask, scale=scale)
    return rearrange(out, "(b w) h l d -> b h (w l) d", b=batch)[..., :n, :]


def fine_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool, gates: Tensor | None = None, scale: float | None = None, first_query: int = 0,
    flex_mask: FlexMaskBuilder | None = None, use_triton: bool = False,
) -> Tensor:  # fmt: skip
    """Fine attention by the path that suits the call; every path gives the same numbers.

    - no slot at all (num_selected 0, or no complete block yet) on a whole sequence:
      `own_block_attention`;
    - `use_triton`: the Triton kernel; else a `flex_mask` builder: flex attention;
    - a decoding step (first_query > 0) or a sequence longer than DENSE_MAX_SEQ_LEN:
      gathered; otherwise dense, faster on a CPU up to there (notebook 04).
    """
    kwargs = dict(block_size=block_size, causal=causal, gates=gates, scale=scale)
    whole = first_query == 0
    if whole and indices.shape[-1] == 0:
        return own_block_attention(q, k, v, block_size=block_size, causal=causal, scale=scale)
    if whole and use_triton:
        return fine_attention_triton(q, k, v, indices, selected, **kwargs)
    if whole and flex_mask is not None:
        return fine_attention_flex(q, k, v, indices, selected, **kwargs, flex_mask=flex_mask)
    if whole and q.shape[-2] <= DENSE_MAX_SEQ_LEN:
        return fine_attention_dense(q, k, v, indices, selected, **kwargs)
    return fine_attention_gathered(q, k, v, indices, selected, **kwargs, first_query=first_query)
