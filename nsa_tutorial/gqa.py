"""Plain attention with grouped-query heads, the building block of every NSA branch.

Query heads are grouped by key/value head as in the reference: query head
`h * group + g` reads key/value head `h` (einops '(h g)').
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import Tensor


def masked_logit(dtype: torch.dtype) -> float:
    """The fill value for hidden keys: a tenth of the most negative finite number.

    Not -inf, so that a row with every key hidden stays finite, and not the very
    most negative number, so that averaging such logits (notebook 03) cannot
    overflow to -inf. The reference uses the same value.
    """
    return -torch.finfo(dtype).max // 10


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention of q (b, hq, i, d) over k, v (b, hk, j, d), hq a multiple of hk.

    mask: bool, broadcastable to (b, hq, i, j) as (i, j) or (b, 1, i, j); True = visible.
    Returns the output (b, hq, i, d) and the scaled logits (b, hq, i, j) after masking.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    q = rearrange(q, "b (h g) i d -> b h g i d", g=group)
    logits = einsum(q, k, "b h g i d, b h j d -> b h g i j") * scale
    logits = rearrange(logits, "b h g i j -> b (h g) i j")
    if mask is not None:
        logits = logits.masked_fill(~mask, masked_logit(logits.dtype))
    weights = rearrange(logits.softmax(dim=-1), "b (h g) i j -> b h g i j", g=group)
    out = einsum(weights, v, "b h g i j, b h j d -> b h g i d")
    return rearrange(out, "b h g i d -> b (h g) i d"), logits
