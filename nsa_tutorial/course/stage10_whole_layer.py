"""Checks for notebook 10: the whole layer on a GPU.

Three exercises:

- `selection_block_weights`: the compressed -> selection block map of notebook 03 as a
  matrix W (w, w'), so that importance needs no (n, w) tensor (scores @ W);
- `compressed_kernel`: a first compressed-attention kernel in Triton, one query row per
  program, over the visible prefix of memory + compressed keys with an online softmax.
  `launch_compressed_kernel` runs it; the notebook shows the same launcher (a test keeps
  the two identical). As in stage 08, the check accepts the kernel itself or any Python
  function with the spec's signature;
- `window_key_tiles`: which tiles of keys a row tile of the window kernel walks, the
  index arithmetic before its loop (`nsa_tutorial/kernels/window.py`'s `_key_span`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_tutorial.course.stage08_triton_forward import (
    HINT_GQA_HEADS,
    HINT_NOT_RESCALED,
    HINT_UNSCALED,
    kernel_as_function,
)
from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- exercise A: the block map as a matrix ------------------------------------------------


def selection_block_weights_spec(num_blocks: int, stride: int, selection_block: int) -> Tensor:
    """(num_blocks, num_blocks * stride // selection_block) float32: entry (c, j) is the
    weight of compressed block c in selection block j. Token t carries the score of
    compressed block t // stride; each complete selection block averages its l' tokens,
    so each of its tokens adds 1 / l' to (t // stride, t // l'). A last, partial
    selection block is dropped."""
    num_selection = num_blocks * stride // selection_block
    weights = torch.zeros(num_blocks, num_selection)
    for j in range(num_selection):
        for t in range(j * selection_block, (j + 1) * selection_block):
            weights[t // stride, j] += 1 / selection_block
    return weights


def _weight_cases() -> list[Case]:
    return [
        Case((6, 4, 8)),  # two compressed blocks per selection block
        Case((7, 4, 8)),  # an odd number: the last compressed block is dropped
        Case((5, 3, 8)),  # stride does not divide l': a compressed block is shared
        Case((8, 16, 64)),  # the paper's sizes
        Case((5, 16, 16)),  # stride = l': the identity
        Case((1, 4, 8)),  # not one complete selection block yet: (1, 0)
    ]


def _weights_by_token(num_blocks, stride, selection_block, *, per_token, num_selection=None):
    """Each token t adds `per_token` to (t // stride, t // l'), over num_selection blocks."""
    if num_selection is None:
        num_selection = num_blocks * stride // selection_block
    weights = torch.zeros(num_blocks, num_selection)
    for t in range(min(num_selection * selection_block, num_blocks * stride)):
        weights[t // stride, t // selection_block] += per_token
    return weights


HINT_COUNTS = (
    "the weights are counts: a selection block averages its l' tokens, so each token adds "
    "1 / selection_block."
)
HINT_PER_STRIDE = (
    "each token adds 1 / stride: the mean is over the selection block's l' tokens, so "
    "divide by selection_block."
)

SELECTION_BLOCK_WEIGHTS = Exercise(
    name="selection_block_weights",
    stage="10",
    hints=(
        (
            "the output is (num_blocks, num_blocks * stride // selection_block), float32: row c "
            "is compressed block c, column j selection block j, so that scores (..., w) @ W "
            "gives the selection-block scores."
        ),
        (
            "the rule: token t belongs to compressed block t // stride and to selection block t "
            "// selection_block; a complete selection block averages its selection_block tokens, "
            "so each token adds 1 / selection_block to W[t // stride, t // selection_block]. A "
            "last, partial selection block is dropped."
        ),
        (
            "a skeleton:\n"
            "    num_selection = ...\n"
            "    tokens = torch.arange(num_selection * selection_block)\n"
            "    weights = torch.zeros(num_blocks, num_selection)\n"
            "    weights.index_put_((tokens // ..., tokens // ...), values, accumulate=True)"
        ),
    ),
    spec=selection_block_weights_spec,
    make_cases=_weight_cases,
    mistakes=(
        Mistake(HINT_COUNTS, lambda w, s, b: _weights_by_token(w, s, b, per_token=1.0)),
        Mistake(HINT_PER_STRIDE, lambda w, s, b: _weights_by_token(w, s, b, per_token=1 / s)),
        Mistake(
            "a last, partial selection block must be dropped (the sliding window covers it): "
            "keep num_blocks * stride // selection_block columns.",
            lambda w, s, b: _weights_by_token(
                w, s, b, per_token=1 / b, num_selection=-(-w * s // b)
            ),
        ),
        Mistake(
            "stride and selection_block are swapped: token t belongs to compressed block "
            "t // stride and to selection block t // selection_block.",
            lambda w, s, b: selection_block_weights_spec(w, b, s),
        ),
        Mistake(
            "the matrix is transposed: rows are compressed blocks (num_blocks), columns "
            "selection blocks.",
            lambda w, s, b: selection_block_weights_spec(w, s, b).T,
        ),
    ),
)

# ---- exercise B: the compressed-attention kernel -----------------------------------------

BLOCK_N = 16  # compressed keys per tile in the launcher


def compressed_kernel_spec(
    q: Tensor, ck: Tensor, cv: Tensor, num_memory: int, stride: int
) -> Tensor:
    """Causal compressed attention: token t attends to the m memory keys and to compressed
    key j iff (j + 1) * stride - 1 < t, that is to the prefix [0, m + t // stride) of
    ck, cv (at most all of them).

    q (b, hq, n, d); ck, cv (b, hk, m + w, d), memory first -> (b, hq, n, d).
    """
    b, hq, n, d = q.shape
    kv_of = torch.arange(hq) // (hq // ck.shape[1])  # each query head's key/value head
    out = torch.zeros_like(q)
    for t in range(n):
        visible = min(num_memory + t // stride, ck.shape[2])
        keys, values = ck[:, kv_of, :visible], cv[:, kv_of, :visible]  # (b, hq, keys, d)
        scores = torch.einsum("bhjd,bhd->bhj", keys, q[:, :, t]) * d**-0.5
        out[:, :, t] = torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), values)
    return out


def launch_compressed_kernel(kernel, q, ck, cv, num_memory: int, stride: int):
    """Run `kernel` with one program per (token, batch * query head) -> out (b, hq, n, d)."""
    b, hq, n, d = q.shape
    hk, num_keys = ck.shape[1], ck.shape[2]
    q, ck, cv = (t.contiguous() for t in (q, ck, cv))  # plain row-major memory
    out = torch.empty_like(q)
    grid = (n, b * hq)  # program (t, bh) computes out[b, h, t, :] with bh = b * hq + h
    kernel[grid](
        q, ck, cv, out,
        n, hq, hk, num_keys, num_memory, stride, d**-0.5,
        BLOCK_N=16, D=d,
    )  # fmt: skip
    return out


def _compressed_cases() -> list[Case]:
    g = torch.Generator().manual_seed(100)

    def case(b, hq, hk, n, m, stride, block, d=16):
        w = max((n - block) // stride + 1, 0)  # compressed blocks, as `compression_windows`
        q = torch.randn(b, hq, n, d, generator=g)
        ck, cv = (torch.randn(b, hk, m + w, d, generator=g) for _ in range(2))
        return Case((q, ck, cv, m, stride))

    return [
        case(1, 2, 2, 72, 1, 4, 8),  # 1 + 17 keys: two tiles of 16; the last tokens see all
        case(2, 4, 2, 24, 2, 4, 4),  # GQA: query heads 0, 1 read kv head 0; two batches
        case(1, 2, 1, 20, 1, 16, 16),  # tokens 0-15 see only the memory token
        case(1, 2, 2, 37, 3, 4, 8),  # n is no multiple of the stride; 3 memory tokens
    ]


def _kernel_like(
    q, ck, cv, num_memory, stride, *, limit_of=None, first_key=0, scale=None, kv_of=None,
    rescale=True, mask_tile=True,
):  # fmt: skip
    """The kernel's walk in PyTorch: tiles of BLOCK_N keys up to each token's limit,
    online softmax. Each keyword reproduces one mistake; the defaults give the spec."""
    b, hq, n, d = q.shape
    hk, num_keys = ck.shape[1], ck.shape[2]
    limit_of = limit_of or (lambda t: num_memory + t // stride)
    first_key = num_memory if first_key is None else first_key  # None: the memory skipped
    kv_of = kv_of or (lambda head: head // (hq // hk))
    scale = d**-0.5 if scale is None else scale
    pad = -num_keys % BLOCK_N + BLOCK_N  # keys past the end read as zeros when not masked
    ck, cv = (F.pad(x, (0, 0, 0, pad)) for x in (ck, cv))
    out = torch.zeros_like(q)
    for bi in range(b):
        for head in range(hq):
            kv = kv_of(head)
            for t in range(n):
                limit = min(limit_of(t), num_keys)
                m, ell, acc = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(d)
                for start in range(first_key, max(limit, first_key), BLOCK_N):
                    keys = torch.arange(start, start + BLOCK_N)
                    s = ck[bi, kv, keys] @ q[bi, head, t] * scale
                    if mask_tile:
                        s = s.masked_fill(keys >= limit, float("-inf"))
                    m_new = torch.maximum(m, s.max())
                    p, alpha = (s - m_new).exp(), (m - m_new).exp()
                    ell = ell * alpha + p.sum()
                    acc = (acc * alpha if rescale else acc) + p @ cv[bi, kv, keys]
                    m = m_new
                out[bi, head, t] = acc / ell  # no key seen: 0 / 0, NaN, as the kernel gives
    return out


def _with(**mistake) -> Callable[..., Tensor]:
    return lambda *args: _kernel_like(*args, **mistake)


def _closes(q, ck, cv, m, stride):
    return _kernel_like(q, ck, cv, m, stride, limit_of=lambda t: m + (t + 1) // stride)


def _own_block(q, ck, cv, m, stride):
    return _kernel_like(q, ck, cv, m, stride, limit_of=lambda t: m + t // stride + 1)


def _modulo_heads(q, ck, cv, m, stride):
    return _kernel_like(q, ck, cv, m, stride, kv_of=lambda head: head % ck.shape[1])


HINT_CLOSES = (
    "token t sees the compressed block it closes: block j ends at (j + 1) * stride - 1, "
    "which must come strictly before t, so t sees num_memory + t // stride keys, not "
    "num_memory + (t + 1) // stride."
)

COMPRESSED_KERNEL = Exercise(
    name="compressed_kernel",
    stage="10",
    hints=(
        (
            "program (t, bh) writes out[b, h, t, :], with bh = b * num_heads + h. The query "
            "starts at Q + (bh * n + t) * D; key j of the (batch, kv head) row kv = b * "
            "num_kv_heads + h // (num_heads // num_kv_heads) starts at CK + (kv * num_keys + j) "
            "* D. The keys are the memory first, then the compressed blocks."
        ),
        (
            "the rule: token t sees the prefix of keys [0, limit) with limit = min(num_memory + "
            "t // stride, num_keys). Walk it in tiles of BLOCK_N keys, mask keys >= limit in the "
            "loads and give them -inf scores, and keep an online softmax (running max m, sum "
            "ell, accumulator acc, the last two rescaled by exp(m - m_new))."
        ),
        (
            "a skeleton:\n"
            "    limit = tl.minimum(...)\n"
            '    m, ell, acc = tl.full((), float("-inf"), tl.float32), ..., tl.zeros((D,), '
            "tl.float32)\n"
            "    for start in range(0, limit, BLOCK_N):\n"
            "        keys = start + tl.arange(0, BLOCK_N); visible = keys < limit\n"
            "        k = tl.load(CK + rows, mask=visible[:, None], other=0.0)  # cv the same\n"
            '        s = tl.where(visible, ... * scale, float("-inf"))\n'
            "        ...  # the online-softmax update\n"
            "    tl.store(OUT + ..., acc / ell)"
        ),
    ),
    spec=compressed_kernel_spec,
    # the learner's @triton.jit kernel, launched as the notebook's launcher does
    prepare=lambda candidate: kernel_as_function(candidate, launch_compressed_kernel, 3),
    make_cases=_compressed_cases,
    mistakes=(
        Mistake(HINT_CLOSES, _closes),
        Mistake(
            "token t sees the block it sits in: compressed key j is visible when "
            "(j + 1) * stride - 1 < t (the block has ended), not when j * stride <= t.",
            _own_block,
        ),
        Mistake(
            "the memory keys are skipped: they come first in ck, cv and every token sees "
            "them, so start the walk at key 0 (tokens before the first block see only them).",
            _with(first_key=None),
        ),
        Mistake(
            "the keys of the last tile past the token's limit are attended: set the scores "
            "of keys >= limit to -inf (a masked load with other=0 is not enough).",
            _with(mask_tile=False),
        ),
        Mistake(HINT_GQA_HEADS, _modulo_heads),
        Mistake(HINT_UNSCALED, _with(scale=1.0)),
        Mistake(HINT_NOT_RESCALED, _with(rescale=False)),
    ),
)

# ---- exercise C: the key tiles of the window kernel's row tile --------------------------


def _keys_seen(first: int, last: int, window: int, n: int, causal: bool) -> tuple[int, int]:
    """The first key that tokens first .. last see, and one past their last: keys t - window
    .. t (causal) or .. t + window, none below 0, and not causal up to n padded to a
    multiple of the window (the zero keys the last queries still see)."""
    num_keys = n if causal else n + (-n % window)
    return max(first - window, 0), last + 1 if causal else min(last + window + 1, num_keys)


def window_key_tiles_spec(
    first: int, last: int, window: int, n: int, causal: bool, block: int
) -> list[int]:
    """The starts, in increasing order, of the tiles of `block` keys that hold a key some
    token first .. last sees."""
    lo, hi = _keys_seen(first, last, window, n, causal)
    return list(range(lo // block * block, hi, block))


def _tile_cases() -> list[Case]:
    return [
        Case((61, 64, 16, 100, True, 16)),  # the last token starts a tile of its own
        Case((47, 50, 16, 100, True, 16)),  # the window reaches one key into a tile
        Case((2, 5, 16, 100, True, 16)),  # the window would start before key 0
        Case((50, 53, 16, 100, False, 16)),  # not causal: keys past the last token
        Case((86, 89, 16, 97, False, 8)),  # and past n: the zero keys 97 .. 105
        Case((0, 3, 512, 4096, True, 64)),  # the layer's window at its first tokens
        Case((1020, 1023, 512, 4096, True, 64)),  # and further on: 9 tiles
    ]


def _last_key_left_out(first, last, window, n, causal, block):
    lo, hi = _keys_seen(first, last, window, n, causal)
    return list(range(lo // block * block, hi - 1, block))


def _unaligned(first, last, window, n, causal, block):
    return list(range(*_keys_seen(first, last, window, n, causal), block))


def _below_zero(first, last, window, n, causal, block):
    _, hi = _keys_seen(first, last, window, n, causal)
    return list(range((first - window) // block * block, hi, block))


def _window_one_short(first, last, window, n, causal, block):
    return window_key_tiles_spec(first + 1, last, window, n, causal, block)


def _always_causal(first, last, window, n, causal, block):
    return window_key_tiles_spec(first, last, window, n, True, block)


def _without_zero_keys(first, last, window, n, causal, block):
    lo, hi = _keys_seen(first, last, window, n, causal)
    return list(range(lo // block * block, min(hi, n), block))


WINDOW_KEY_TILES = Exercise(
    name="window_key_tiles",
    stage="10",
    hints=(
        (
            "the answer is a list of ints, the tiles' first keys, in increasing order: every "
            "tile of `block` keys (starting at a multiple of block) that holds a key one of "
            "the tokens first .. last sees."
        ),
        (
            "the rule: the first key seen is max(first - window, 0); the last is last (causal) "
            "or last + window, but not causal no further than the keys that exist: n padded "
            "to a multiple of the window (n + (-n % window)), minus one. Round the first key "
            "down to its tile and walk tiles up to the last key."
        ),
        (
            "a skeleton:\n"
            "    num_keys = n if causal else ...\n"
            "    lo = max(..., 0) // block * block\n"
            "    hi = last + 1 if causal else min(..., num_keys)  # one past the last key\n"
            "    return list(range(lo, hi, block))"
        ),
    ),
    spec=window_key_tiles_spec,
    make_cases=_tile_cases,
    mistakes=(
        Mistake(
            "the last key seen is left out: a range's end is exclusive, so walk up to one "
            "past it (last + 1 causal: a token sees itself).",
            _last_key_left_out,
        ),
        Mistake(
            "the tiles must start at multiples of block: round the first key seen down to "
            "its tile (// block * block).",
            _unaligned,
        ),
        Mistake("there are no keys below 0: start at max(first - window, 0).", _below_zero),
        Mistake(
            "a token sees window + 1 keys, t - window .. t: the first key is first - window, "
            "not first - window + 1.",
            _window_one_short,
        ),
        Mistake(
            "not causal, token t also sees the keys after it, up to t + window.",
            _always_causal,
        ),
        Mistake(
            "not causal, the last tokens also see the zero keys past n: the keys go up to n "
            "padded to a multiple of the window, n + (-n % window).",
            _without_zero_keys,
        ),
    ),
)

EXERCISES = [SELECTION_BLOCK_WEIGHTS, COMPRESSED_KERNEL, WINDOW_KEY_TILES]
