"""Stage 02: the compression branch (paper §3.3.1, Eq. 7).

Keys and values are cut into blocks of `block_size` tokens, a new block every
`stride` tokens; each block, plus learned intra-block positions, is squeezed by an
MLP into a single key or value. A few learned memory tokens go in front, and each
query attends to the compressed tokens of blocks that ended before it.

The parameters (memory tokens, positions, MLPs) belong to `SparseAttention`, under
the reference's names; the functions here take them as arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from nsa_tutorial.gqa import attend


def num_compressed_blocks(seq_len: int, stride: int) -> int:
    """Blocks whose last token lies in the sequence: one per full stride."""
    return seq_len // stride


def compression_windows(x: Tensor, block_size: int, stride: int) -> Tensor:
    """Overlapping blocks of x (b, h, n, d) -> (b, h, w, block_size, d).

    Block j ends at token (j + 1) * stride - 1 and starts block_size tokens earlier;
    the first blocks reach before token 0, so the sequence is left-padded with
    block_size - stride zeros (as the reference does). Tokens after the last full
    stride belong to no block yet.
    """
    w = num_compressed_blocks(x.shape[-2], stride)
    if w == 0:
        return x.new_zeros(*x.shape[:-2], 0, block_size, x.shape[-1])
    x = x[..., : w * stride, :]
    x = F.pad(x, (0, 0, block_size - stride, 0))
    windows = x.unfold(-2, block_size, stride)  # (b, h, w, d, l)
    return rearrange(windows, "b h w d l -> b h w l d")


def default_compress_mlp(block_size: int, dim_head: int, expand_factor: float = 1.0) -> nn.Module:
    """Linear -> ReLU -> Linear over a flattened block: (b, h, w, n, d) -> (b, h, w, d).

    Laid out as the reference's, so `k_compress.1.weight` etc. load as they are.
    """
    flat = block_size * dim_head
    hidden = int(expand_factor * flat)
    return nn.Sequential(
        Rearrange("b h w l d -> b h w (l d)"),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, dim_head),
    )


def compress(x: Tensor, positions: Tensor, mlp: nn.Module, block_size: int, stride: int) -> Tensor:
    """Compressed tokens of x (b, h, n, d): one per block -> (b, h, w, d).

    positions (h, block_size, d) are the learned intra-block positions, added to
    every block before the MLP (Eq. 7's phi sees where in the block each token sits).
    """
    windows = compression_windows(x, block_size, stride)  # (b, h, w, n, d)
    return mlp(windows + positions[:, None])


def prepend_memory(compressed: Tensor, memory: Tensor) -> Tensor:
    """Put the learned memory tokens memory (h, m, d) before compressed (b, h, w, d)."""
    memory = repeat(memory, "h m d -> b h m d", b=compressed.shape[0])
    return torch.cat((memory, compressed), dim=-2)


def compressed_causal_mask(
    seq_len: int,
    num_blocks: int,
    stride: int,
    num_memory: int,
    device: torch.device | None = None,
    first_query: int = 0,
) -> Tensor:
    """(seq_len, num_memory + num_blocks) bool: may query i see compressed token j?

    Memory tokens are always visible. Block j is visible once it has ended, strictly:
    its last token (j + 1) * stride - 1 must come before the query. (The paper would
    let a query see the block it closes; the reference does not.) Rows are the
    queries first_query .. first_query + seq_len - 1 (a decoding step has one).
    """
    queries = torch.arange(seq_len, device=device) + first_query
    block_ends = (torch.arange(num_blocks, device=device) + 1) * stride - 1
    visible = block_ends[None, :] < queries[:, None]  # (i, w)
    memory = torch.ones(seq_len, num_memory, dtype=torch.bool, device=device)
    return torch.cat((memory, visible), dim=-1)


def compressed_attention(
    q: Tensor,
    ck: Tensor,
    cv: Tensor,
    num_memory: int,
    stride: int,
    causal: bool,
    scale: float | None = None,
    first_query: int = 0,
) -> tuple[Tensor, Tensor]:
    """Attention of q (b, hq, n, d) over memory + compressed keys/values (b, hk, m + w, d).

    q's rows are the queries first_query, first_query + 1, ...

    Returns the output (b, hq, n, d) and the logits (b, hq, n, m + w), which notebook
    03 turns into importance scores. No rotary here: a compressed token stands for a
    whole block, not for a position.
    """
    mask = None
    if causal:
        num_blocks = ck.shape[-2] - num_memory
        mask = compressed_causal_mask(
            q.shape[-2], num_blocks, stride, num_memory, q.device, first_query
        )
    return attend(q, ck, cv, mask=mask, scale=scale)
