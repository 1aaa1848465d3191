"""Stage 05: the sliding-window branch (paper §3.3.3).

Each query attends at full resolution to the last `window` tokens before it and
itself (causal: keys i - w .. i) or, not causal, to keys i - w .. i + w. It keeps
local patterns from having to compete with the long-range branches for attention.

Computed block by block, as the reference's exact-window local attention does:
queries in chunks of `window`, each chunk reading its own chunk of keys and the one
before (and, not causal, the one after), so the cost is O(n * w), not O(n^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def sliding_window_mask(seq_len: int, window: int, causal: bool) -> Tensor:
    """(seq_len, seq_len) bool: may query i see key j? (j in i - w .. i, or .. i + w)."""
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    visible = j >= i - window
    return visible & (j <= i) if causal else visible & (j <= i + window)


def _neighbour_chunks(x: Tensor, forward: bool) -> Tensor:
    """(b, h, c, l, d) chunks -> (b, h, c, 2l or 3l, d): the previous, own (and next) chunk."""
    padded = F.pad(x, (0, 0, 0, 0, 1, 1 if forward else 0))
    parts = (
        [padded[:, :, :-2], padded[:, :, 1:-1], padded[:, :, 2:]]
        if forward
        else [padded[:, :, :-1], padded[:, :, 1:]]
    )
    return torch.cat(parts, dim=-2)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, scale: float | None = None
) -> Tensor:
    """q (b, hq, n, d) over k, v (b, hk, n, d) within the window -> (b, hq, n, d).

    Not causal, keys past the end of a sequence that is not a multiple of `window`
    are zeros that queries near the end still see, as in the reference.
    """
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    pad = -n % window
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    chunks = (n + pad) // window
    q = rearrange(q, "b (h g) (c l) d -> b h g c l d", g=group, l=window)
    k, v = (
        _neighbour_chunks(rearrange(t, "b h (c l) d -> b h c l d", l=window), not causal)
        for t in (k, v)
    )  # (b, hk, c, keys, d)
    query_pos = torch.arange(n + pad, device=q.device).reshape(chunks, window, 1)
    key_pos = (torch.arange(chunks, device=q.device)[:, None] - 1) * window + torch.arange(
        k.shape[-2], device=q.device
    )  # (c, keys): absolute position of each neighbour key; < 0 is before the start
    offset = key_pos[:, None, :] - query_pos  # (c, l, keys): j - i
    inside = (key_pos >= 0) & (key_pos < n + pad)  # (c, keys): not the zeros around the chunks
    visible = (offset >= -window) & (offset <= (0 if causal else window)) & inside[:, None]
    logits = einsum(q, k, "b h g c i d, b h c j d -> b h g c i j") * scale
    logits = logits.masked_fill(~visible, -torch.finfo(logits.dtype).max)
    out = einsum(logits.softmax(dim=-1), v, "b h g c i j, b h c j d -> b h g c i d")
    return rearrange(out, "b h g c l d -> b (h g) (c l) d")[..., :n, :]


def sliding_window_flex_mask(seq_len: int, window: int, causal: bool) -> BlockMask:
    """A flex-attention BlockMask of the same window, for SparseAttention's
    `sliding_window_flex_mask` argument.

    Not causal, the keys are padded with zeros to a multiple of the window, as the
    default path (and the reference) does, so both give the same numbers.
    """
    num_keys = seq_len if causal else seq_len + (-seq_len % window)

    def visible(batch, head, query, key):
        distance = query - key
        return (distance <= window) & (distance >= (0 if causal else -window))

    return create_block_mask(visible, None, None, seq_len, num_keys, device="cpu")


def sliding_window_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None = None
) -> Tensor:
    """The sliding window through flex attention with a mask from sliding_window_flex_mask."""
    pad = block_mask.seq_lengths[1] - k.shape[-2]
    k, v = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
