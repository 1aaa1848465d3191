"""Stage 07: the two pieces of a decoding step that the full forward does not have.

The running buffer holds the keys (or values) after the last compressed block; each
new token joins it, and when it holds a full block that block is compressed and the
buffer keeps the block_size - stride tokens the next block shares. The single-token
selection is the selection branch for the newest token alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.selection import selection_attention_rows


def update_running_buffer(
    running: Tensor, new: Tensor, block_size: int, stride: int
) -> tuple[Tensor | None, Tensor]:
    """Append new (b, h, 1, d) to running (b, h, r, d).

    Returns (block, running): the full block (b, h, block_size, d) to compress, or
    None, and the buffer to keep.
    """
    running = torch.cat((running, new), dim=-2)
    if running.shape[-2] < block_size:
        return None, running
    return running, running[..., stride:, :]


def single_token_selection(
    q: Tensor, k: Tensor, v: Tensor, importance: Tensor, num_selected: int, block: int
) -> Tensor:
    """The selected branch for the newest token: q (b, hq, 1, d) at position n - 1 over
    the rotated keys and values (b, hk, n, d) so far, importance (b, h, 1, w)."""
    return selection_attention_rows(q, k, v, importance, num_selected, block, k.shape[-2] - 1)
