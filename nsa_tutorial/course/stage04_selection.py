"""Checks for notebook 04: top-n blocks, gathering them, fine attention."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.stage00_welcome import HINT_OVERFLOW, softmax_without_max
from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- top-n ------------------------------------------------------------------------------------


def top_blocks_spec(importance: Tensor, num_selected: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the min(num_selected, w) largest scores of each row, largest first."""
    n = min(num_selected, importance.shape[-1])
    values, indices = importance.sort(dim=-1, descending=True, stable=True)
    return values[..., :n], indices[..., :n]


def _top_cases() -> list[Case]:
    g = torch.Generator().manual_seed(40)
    return [
        Case((torch.rand(1, 2, 5, 8, generator=g), 3)),
        Case((torch.rand(2, 1, 4, 2, generator=g), 4)),  # fewer blocks than asked for
        Case((torch.rand(1, 1, 3, 0, generator=g), 2)),  # no complete block yet
    ]


TOP_BLOCKS = Exercise(
    name="top_blocks",
    stage="04",
    hints=(
        (
            "importance is (b, h, i, w): one score per block for every query. Return (values, "
            "indices), each (b, h, i, min(num_selected, w)), the largest first."
        ),
        (
            "the rule: the min(num_selected, w) largest scores of each row and their block "
            "numbers. Early queries have fewer blocks than num_selected, and a row may have none "
            "(w = 0)."
        ),
        (
            "a skeleton: count = min(..., importance.shape[-1]); then one call of "
            "importance.topk(count, dim=...)."
        ),
    ),
    spec=top_blocks_spec,
    make_cases=_top_cases,
    mistakes=(
        Mistake(
            "top-n is not clipped: early queries have fewer than n blocks, so take "
            "min(num_selected, importance.shape[-1]).",
            lambda importance, n: importance.topk(n, dim=-1),
        ),
        Mistake(
            "these are the smallest scores; topk wants the largest (largest=True).",
            lambda importance, n: importance.topk(min(n, importance.shape[-1]), largest=False),
        ),
    ),
)

# ---- gathering blocks ---------------------------------------------------------------------------


def gather_blocks_spec(x: Tensor, indices: Tensor, block: int) -> Tensor:
    """x (b, hk, n, d), indices (b, h, i, s) -> (b, h, i, s, block, d): block indices[..., s]
    of key/value head h // (h / hk), zero-padded past the end of the sequence."""
    b, h, i, s = indices.shape
    group = h // x.shape[1]
    out = x.new_zeros(b, h, i, s, block, x.shape[-1])
    for bi in range(b):
        for hi in range(h):
            for qi in range(i):
                for si in range(s):
                    start = indices[bi, hi, qi, si].item() * block
                    tokens = x[bi, hi // group, start : start + block]
                    out[bi, hi, qi, si, : len(tokens)] = tokens
    return out


def _gather_cases() -> list[Case]:
    g = torch.Generator().manual_seed(41)

    def case(x_shape, indices_shape, num_blocks, block):
        x = torch.randn(*x_shape, generator=g)
        return Case((x, torch.randint(0, num_blocks, indices_shape, generator=g), block))

    return [
        case((1, 1, 8, 2), (1, 1, 8, 2), 2, 4),
        case((2, 2, 10, 3), (2, 2, 10, 2), 3, 4),  # a partial last block
        case((1, 2, 6, 2), (1, 4, 6, 1), 3, 2),  # one selection per query head
    ]


def _gather_head_mod(x, indices, block):
    x = x.repeat(1, indices.shape[1] // x.shape[1], 1, 1)  # head h reads h % hk: wrong
    return gather_blocks_spec(x, indices, block)


GATHER_BLOCKS = Exercise(
    name="gather_blocks",
    stage="04",
    hints=(
        (
            "x is (b, hk, T, dh); indices is (b, h, i, s): s block numbers for each query, where "
            "h is hk or a multiple of it. The output (b, h, i, s, block, dh) holds the tokens of "
            "each listed block."
        ),
        (
            "the rule: block k is tokens k * block .. k * block + block - 1, zero-padded past "
            "the end of the sequence; head h reads key/value head h // (h_indices / hk), so "
            "neighbouring heads share one."
        ),
        (
            "a skeleton: pad T up to a multiple of block (F.pad(x, (0, 0, 0, -T % block))); "
            'blocks = rearrange(x, "b h (w l) d -> b h w l d", l=block); repeat the heads with '
            "repeat_interleave(..., dim=1); then index blocks[batch, heads, indices] with "
            "aranges shaped (b, 1, 1, 1) and (1, h, 1, 1)."
        ),
    ),
    spec=gather_blocks_spec,
    make_cases=_gather_cases,
    mistakes=(
        Mistake(
            "with one selection per query head, query head h reads key/value head h // group, "
            "not h % kv_heads (repeat with einops 'b h ... -> b (h g) ...').",
            _gather_head_mod,
        ),
    ),
)

# ---- fine attention -------------------------------------------------------------------------


def fine_attention_spec(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, selected: Tensor, *, block_size: int,
    causal: bool,
) -> Tensor:  # fmt: skip
    """Query i attends to the keys of its selected blocks (when causal, only blocks
    before its own) and, when causal, to keys j <= i of its own block.

    q (b, hq, n, d); k, v (b, hk, n, d); indices, selected (b, h, n, s) with h = hk or hq.
    """
    b, hq, n, d = q.shape
    h, block = indices.shape[1], block_size
    out = torch.empty_like(q)
    for bi in range(b):
        for head in range(hq):
            sel_head = head // (hq // h)
            kv_head = head // (hq // k.shape[1])
            for i in range(n):
                keys = set()
                for index, chosen in zip(
                    indices[bi, sel_head, i].tolist(),
                    selected[bi, sel_head, i].tolist(),
                    strict=True,
                ):
                    if chosen and (not causal or index < i // block):
                        keys |= set(range(index * block, min((index + 1) * block, n)))
                if causal:
                    keys |= set(range(i // block * block, i + 1))
                keys = sorted(keys)
                scores = k[bi, kv_head, keys] @ q[bi, head, i] * d**-0.5
                out[bi, head, i] = scores.softmax(-1) @ v[bi, kv_head, keys]
    return out


def _fine_cases() -> list[Case]:
    g = torch.Generator().manual_seed(42)

    def case(b, hq, hk, h, n, d, block, s, causal, loud=1.0):
        q, k, v = (torch.randn(b, heads, n, d, generator=g) for heads in (hq, hk, hk))
        q = loud * q
        blocks = -(-n // block)
        # each query picks s distinct blocks among the complete blocks before its own
        indices = torch.stack(
            [torch.randperm(max(blocks - 1, s), generator=g)[:s] for _ in range(b * h * n)]
        ).reshape(b, h, n, s)
        selected = torch.rand(b, h, n, s, generator=g) > 0.3
        if not causal:
            selected[..., 0] = True  # every query sees something
        return Case((q, k, v, indices, selected), {"block_size": block, "causal": causal})

    return [
        case(1, 2, 2, 2, 12, 4, 4, 2, True),
        case(2, 4, 2, 2, 10, 4, 4, 1, True),  # GQA, a partial last block
        case(1, 4, 1, 4, 9, 4, 2, 2, True),  # one selection per query head
        case(1, 2, 1, 1, 8, 4, 4, 1, False),
        case(1, 4, 2, 2, 11, 4, 4, 2, True, loud=100.0),  # scores in the hundreds
    ]


def _fine_with(
    q,
    k,
    v,
    indices,
    selected,
    *,
    block_size,
    causal,
    diagonal="causal",
    use_selected=True,
    scale=None,
    softmax=None,
):
    from nsa_tutorial.fine_attention import fine_mask, past_blocks_only

    n, block = q.shape[-2], block_size
    chosen = selected if use_selected else torch.ones_like(selected)
    if causal:
        chosen = past_blocks_only(indices, chosen, block)
    mask = fine_mask(indices, chosen, seq_len=n, block_size=block, causal=False)
    if causal:
        positions = torch.arange(n)
        own = (positions[:, None] // block) == (positions[None, :] // block)
        if diagonal == "causal":
            own = own & (positions[:, None] >= positions[None, :])
        if diagonal != "none":
            mask = mask | own
    mask = mask.repeat_interleave(q.shape[1] // indices.shape[1], dim=1)
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask, -1e30)
    return (scores.softmax(-1) if softmax is None else softmax(scores)) @ v


FINE_ATTENTION = Exercise(
    name="fine_attention",
    stage="04",
    hints=(
        (
            "q is (b, hq, T, dh); k and v are (b, hk, T, dh); indices and selected are (b, h, T, "
            "s): for each query, s block numbers and whether each slot counts, with h = hk or "
            "hq. The output has the shape of q."
        ),
        (
            "the rule: query i attends to the keys of its selected blocks (when causal, only "
            "blocks before its own: index < i // block_size) and, when causal, to keys i // "
            "block_size * block_size .. i of its own block. Scale by dh ** -0.5; the blocks may "
            "end in a partial last block."
        ),
        (
            "a skeleton: build a (b, h, T, T) key mask.\n"
            "    key_block = torch.arange(T) // block_size\n"
            "    chosen = torch.zeros(b, h, T, num_blocks, dtype=torch.bool).scatter(-1, "
            "indices, ...)\n"
            "    mask = chosen[..., key_block]  # (b, h, i, j)\n"
            "then OR in the own block's causal diagonal, repeat mask, k, v to hq heads, and "
            "masked_fill(~mask, ...) before the softmax."
        ),
    ),
    spec=fine_attention_spec,
    make_cases=_fine_cases,
    mistakes=(
        Mistake(
            "the block-causal diagonal is missing: when causal, query i also sees keys "
            "i // block * block .. i of its own block.",
            lambda *a, **kw: _fine_with(*a, **kw, diagonal="none"),
        ),
        Mistake(
            "the own block is attended whole; within it, query i may only see keys j <= i.",
            lambda *a, **kw: _fine_with(*a, **kw, diagonal="full"),
        ),
        Mistake(
            "`selected` is ignored: blocks whose importance fell under the threshold must "
            "not be attended.",
            lambda *a, **kw: _fine_with(*a, **kw, use_selected=False),
        ),
        Mistake(
            "the scores are not scaled by dim_head ** -0.5.",
            lambda *a, **kw: _fine_with(*a, **kw, scale=1.0),
        ),
        Mistake(HINT_OVERFLOW, lambda *a, **kw: _fine_with(*a, **kw, softmax=softmax_without_max)),
    ),
)

EXERCISES = [TOP_BLOCKS, GATHER_BLOCKS, FINE_ATTENTION]
