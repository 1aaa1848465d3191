"""Stage 05: the sliding-window branch (paper §3.3.3).

Each query attends at full resolution to the last `window` tokens before it and
itself (causal: keys i - w .. i) or, not causal, to keys i - w .. i + w. It keeps
local patterns from having to compete with the long-range branches for attention.

Computed block by block, as the reference's exact-window local attention does:
queries in chunks of `window`, each chunk reading its own chunk of keys and the one
before (and, not causal, the one after), so the cost is O(n * w), not O(n^2).

On a GPU, `sliding_window_attention_gpu` computes the same numbers through compiled
flex attention (notebook 10): the window becomes a BlockMask of 128 x 128 tiles, built
from block arithmetic and cached per length, and one fused kernel skips the tiles
outside the window, forward and backward, without the chunks' (n, 2w) scores. The layer's
kernel path uses `nsa_tutorial.kernels.window` instead: Triton kernels that share each key
tile among a GQA group's heads and compile once for every length (their docstring has the
measurements against flex attention).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nsa_tutorial.validation import require_positive_int


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


@functools.cache
def window_mask_mod(window: int, causal: bool) -> Callable:
    """The window rule as a flex-attention mask_mod: may `query` see `key`?

    Made once per (window, causal), so that the masks of every length share one
    function: compiled flex attention guards on the mask_mod, and a fresh one for
    each mask would compile the kernel again.
    """

    def visible(batch, head, query, key):
        distance = query - key
        return (distance <= window) & (distance >= (0 if causal else -window))

    return visible


def _block_spans(num_tokens: int, block_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last token (w,) of each block of `block_size` tokens; the last block
    may be short."""
    first = torch.arange(0, num_tokens, block_size, device=device)
    return first, (first + block_size).clamp(max=num_tokens) - 1


def _kv_block_lists(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """(wq, wk) bool tiles -> (1, 1, wq) how many key blocks each query block reads and
    (1, 1, wq, wk) which, those first in increasing order: BlockMask's layout."""
    tiles = tiles.to(torch.int32)
    counts = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None].contiguous(), order[None, None].contiguous()


def _window_block_mask(
    seq_len: int,
    num_keys: int,
    window: int,
    causal: bool,
    device: torch.device,
    block_size: int,
) -> BlockMask:
    """The window's BlockMask over `num_keys` keys, tile by tile from the tiles' corners.

    A tile of queries i and keys j holds every distance i - j between its two corners,
    so it touches the window when those ranges overlap and lies wholly inside when the
    window holds both corners (tiles cut short by the end are never whole, as in
    create_block_mask). No (seq_len, num_keys) mask is made: at 128k tokens that dense
    mask (create_block_mask's way) needs over 100 GiB.
    """
    q_first, q_last = _block_spans(seq_len, block_size, device)  # (wq,)
    k_first, k_last = _block_spans(num_keys, block_size, device)  # (wk,)
    nearest = q_first[:, None] - k_last[None, :]  # (wq, wk): smallest i - j in the tile
    farthest = q_last[:, None] - k_first[None, :]  # (wq, wk): largest i - j in the tile
    lowest = 0 if causal else -window
    touched = (nearest <= window) & (farthest >= lowest)
    complete = ((q_last - q_first)[:, None] == block_size - 1) & (
        (k_last - k_first)[None, :] == block_size - 1
    )
    whole = (nearest >= lowest) & (farthest <= window) & complete
    return BlockMask.from_kv_blocks(
        *_kv_block_lists(touched & ~whole),
        *_kv_block_lists(whole),
        BLOCK_SIZE=block_size,
        mask_mod=window_mask_mod(window, causal),
        seq_lengths=(seq_len, num_keys),
    )


def sliding_window_flex_mask(
    seq_len: int,
    window: int,
    causal: bool,
    device: str | torch.device = "cpu",
    block_size: int = 128,
) -> BlockMask:
    """A flex-attention BlockMask of the same window, for SparseAttention's
    `sliding_window_flex_mask` argument, on `device` (the tensors' device on a GPU).

    Not causal, the keys are padded with zeros to a multiple of the window, as the
    default path (and the reference) does, so both give the same numbers.
    It equals create_block_mask(window_mask_mod(window, causal), ...) (a test checks)
    but is built from the tiles' corners, in milliseconds at any length.
    """
    # New: built from block arithmetic on `device`, instead of create_block_mask on the CPU.
    require_positive_int("seq_len", seq_len)
    require_positive_int("window", window)
    require_positive_int("block_size", block_size)
    num_keys = seq_len if causal else seq_len + (-seq_len % window)
    return _window_block_mask(seq_len, num_keys, window, causal, torch.device(device), block_size)


@functools.lru_cache(maxsize=8)
def cached_sliding_window_flex_mask(
    seq_len: int, window: int, causal: bool, device: torch.device
) -> BlockMask:
    """sliding_window_flex_mask, built once per (seq_len, window, causal, device).

    A training loop sees a few lengths again and again; eight masks cover them and
    hold a few MiB at 128k tokens (two (n / 128)^2 int32 index tables each).
    """
    return sliding_window_flex_mask(seq_len, window, causal, device)


@functools.cache
def compiled_flex_attention() -> Callable:
    """torch.compile(flex_attention), made on the first call, not at import: compiling
    takes seconds, and only the GPU path needs it. Uncompiled, flex attention computes
    every score (n x n) in PyTorch; compiled, it is one Triton kernel that skips the
    tiles the mask leaves out. Default (automatic) dynamic shapes: the first length gets
    a kernel specialised to it, a second length one kernel for every length, so a new
    length never compiles again. That kernel is slower (H200, 8k-128k tokens: forward
    +20%, forward + backward +35%, benchmarks/sliding_window_gpu.json), but a kernel per
    length (dynamic=False) would, past dynamo's recompile limit (8), fall back to
    uncompiled flex attention and its n x n scores.
    """
    return torch.compile(flex_attention)


def _flex_window(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: float | None,
    attend: Callable,
) -> Tensor:
    """q (b, hq, n, d) over k, v (b, hk, n, d) padded with zero keys to the mask's
    length (the non-causal quirk), through `attend` (flex attention, compiled or not)."""
    pad = block_mask.seq_lengths[1] - k.shape[-2]
    if pad:  # F.pad would copy k and v even by zero rows
        k, v = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))  # (b, hk, n + pad, d)
    return attend(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def sliding_window_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float | None = None
) -> Tensor:
    """The sliding window through flex attention with a mask from sliding_window_flex_mask."""
    return _flex_window(q, k, v, block_mask, scale, flex_attention)


def _check_window_inputs(q: Tensor, k: Tensor, v: Tensor, window: int) -> None:
    """Raise ValueError/TypeError naming the argument unless q (b, hq, n, d), k and v
    (b, hk, n, d) fit together, hk divides hq, and window is a positive int."""
    require_positive_int("window", window)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (b, h, n, d), got {name}.shape={tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, d) or hq % k.shape[1]:
        raise ValueError(
            f"k must be (b, hk, n, d) with hk dividing hq for q (b, hq, n, d), got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
        )
    if len({t.device for t in (q, k, v)}) > 1 or len({t.dtype for t in (q, k, v)}) > 1:
        raise ValueError(
            f"q, k and v must share one device and dtype, got devices "
            f"{q.device}, {k.device}, {v.device} and dtypes {q.dtype}, {k.dtype}, {v.dtype}"
        )


def sliding_window_attention_gpu(
    q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, scale: float | None = None
) -> Tensor:
    """sliding_window_attention's numbers through compiled flex attention on a CUDA GPU.

    Args:
        q: (b, hq, n, d) queries.
        k, v: (b, hk, n, d) keys and values; hk divides hq (GQA).
        window: keys i - window .. i (causal) or .. i + window each query sees.
        causal: whether queries see only earlier keys.
        scale: logit scale, d ** -0.5 when None.

    Returns (b, hq, n, d), differentiable. The BlockMask is cached per (n, window,
    causal, device) and flex attention compiled once, on the first call: expect
    seconds of compiling at the first length, the first backward and a second length.
    Not on CUDA, this is sliding_window_attention itself (exact, with gradients): on
    the CPU, flex attention has no backward (torch 2.13), and compiling it takes
    seconds per length for no gain at CPU sizes.
    """
    _check_window_inputs(q, k, v, window)
    if q.device.type != "cuda":
        return sliding_window_attention(q, k, v, window, causal, scale)
    block_mask = cached_sliding_window_flex_mask(q.shape[-2], window, bool(causal), q.device)
    return _flex_window(q, k, v, block_mask, scale, compiled_flex_attention())
