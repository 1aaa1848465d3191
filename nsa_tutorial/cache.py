"""Stage 07: decoding one token at a time with a cache.

The cache keeps what the next token needs from the past: the rotated keys and the
values of every token (selection and sliding window), the compressed keys and values
(compression), and the running buffer of keys and values after the last compressed
block. Each new token joins the buffer; when it holds a full block, that block is
compressed and the buffer keeps the block_size - stride tokens the next block shares.
A decoding step then equals the last row of the full forward (notebook 07 checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_tutorial.gqa import attend

if TYPE_CHECKING:
    from nsa_tutorial.attention import SparseAttention


class KeysValues(NamedTuple):
    """Keys and values, each (b, kv_heads, length, dim_head)."""

    keys: Tensor
    values: Tensor


class CompressionState(NamedTuple):
    """The compressed keys/values so far and the tokens after the last compressed block."""

    compressed: KeysValues
    running: KeysValues


class Cache(NamedTuple):
    """What `SparseAttention(..., return_cache=True)` returns beside its output.

    It unpacks like the reference's nested tuple:
    `(k, v), ((compressed_k, compressed_v), (running_k, running_v)) = cache`.
    """

    tokens: KeysValues  # rotated keys, values
    compression: CompressionState


def running_buffer(k: Tensor, v: Tensor, block_size: int, stride: int) -> KeysValues:
    """After a prefill of unrotated k, v (b, h, n, d): the tokens after the last compressed
    block, with the block_size - stride tokens before them that the next block shares
    (zeros before token 0)."""
    overlap = block_size - stride
    start = k.shape[-2] // stride * stride
    return KeysValues(*(F.pad(t, (0, 0, overlap, 0))[..., start:, :] for t in (k, v)))


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


def decode_step(attention: SparseAttention, inp: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
    """One token inp (b, 1, dim) after the cached ones -> (output (b, 1, dim), new cache)."""
    check_cache(attention, inp, cache)
    (cache_k, cache_v), ((ck, cv), (run_k, run_v)) = cache
    position = cache_k.shape[-2]
    block, stride = attention.compress_block_size, attention.compress_block_sliding_stride
    x = attention.norm(inp)
    q, k, v = attention.project_heads(x)

    k_block, run_k = update_running_buffer(run_k, k, block, stride)
    v_block, run_v = update_running_buffer(run_v, v, block, stride)
    if k_block is not None:  # this token closes a block: compress it (a single window)
        new_k, new_v = attention.compressed_tokens(k_block, v_block, stride=block)
        ck, cv = torch.cat((ck, new_k), dim=-2), torch.cat((cv, new_v), dim=-2)
    compressed, top = attention.compressed_branch(q, ck, cv, first_query=position)

    rotated_q = attention.rotary_emb.rotate_queries_or_keys(q, offset=position)
    rotated_k = attention.rotary_emb.rotate_queries_or_keys(k, offset=position)
    keys, values = torch.cat((cache_k, rotated_k), dim=-2), torch.cat((cache_v, v), dim=-2)
    selected = attention.selected_branch(rotated_q, keys, values, top, first_query=position)
    window = slice(max(position - attention.sliding_window_size, 0), None)
    sliding, _ = attend(
        rotated_q, keys[..., window, :], values[..., window, :], scale=attention.scale
    )
    out = attention.combine(x, compressed, selected, sliding)
    new_cache = Cache(
        KeysValues(keys, values),
        CompressionState(KeysValues(ck, cv), KeysValues(run_k, run_v)),
    )
    return out, new_cache


def check_cache(attention: SparseAttention, inp: Tensor, cache: object) -> None:
    """Raise ValueError unless `cache` fits this module and the one new token `inp`."""
    if not attention.causal:
        raise ValueError("decoding with a cache needs causal=True")
    if inp.shape[1] != 1:
        raise ValueError(
            f"with a cache, inp must be one new token (batch, 1, dim), got seq_len={inp.shape[1]}"
        )
    try:
        (cache_k, cache_v), ((ck, cv), (run_k, run_v)) = cache
    except (TypeError, ValueError):
        raise ValueError(
            "cache must be what forward(..., return_cache=True) returned: "
            "((k, v), ((compressed_k, compressed_v), (running_k, running_v)))"
        ) from None
    batch, t = inp.shape[0], cache_k.shape[-2]
    stride = attention.compress_block_sliding_stride
    overlap = attention.compress_block_size - stride
    expected = {
        "cached keys": (cache_k, t),
        "cached values": (cache_v, t),
        "compressed keys": (ck, t // stride),
        "compressed values": (cv, t // stride),
        "running keys": (run_k, t - t // stride * stride + overlap),
        "running values": (run_v, t - t // stride * stride + overlap),
    }
    for name, (tensor, length) in expected.items():
        shape = (batch, attention.kv_heads, length, attention.dim_head)
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(
                f"the cache does not fit this module and input: its {name} should have "
                f"shape {shape} (batch, kv_heads, length, dim_head), got {got}"
            )
