"""Checks for notebook 02: compression blocks, compressed tokens with memory, their causal
visibility, compressed attention.

The specs loop over blocks, tokens and queries one at a time: slow and plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from nsa_tutorial.course.stage00_welcome import HINT_OVERFLOW, softmax_without_max
from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- splitting into blocks -------------------------------------------------------------


def compression_windows_spec(x: Tensor, block_size: int, stride: int) -> Tensor:
    """x (b, h, n, d) -> (b, h, w, block_size, d): block j holds the block_size tokens
    ending at (j + 1) * stride - 1; positions before 0 are zeros."""
    w = x.shape[-2] // stride
    out = x.new_zeros(*x.shape[:2], w, block_size, x.shape[-1])
    for j in range(w):
        last = (j + 1) * stride - 1
        for t in range(block_size):
            position = last - block_size + 1 + t
            if position >= 0:
                out[:, :, j, t] = x[:, :, position]
    return out


def _windows_from_start(x, block_size, stride):
    """Blocks that start at j * stride (no left padding), right-padded with zeros."""
    w = x.shape[-2] // stride
    x = F.pad(x, (0, 0, 0, block_size))
    return torch.stack([x[:, :, j * stride : j * stride + block_size] for j in range(w)], dim=2)


def _windows_with_partial(x, block_size, stride):
    n = x.shape[-2]
    padded = F.pad(x, (0, 0, 0, -n % stride))
    return compression_windows_spec(padded, block_size, stride)


def _window_cases() -> list[Case]:
    g = torch.Generator().manual_seed(20)
    return [
        Case((torch.randn(1, 2, 16, 3, generator=g), 4, 4)),
        Case((torch.randn(2, 1, 19, 2, generator=g), 8, 4)),  # overlapping, 3 tokens left over
        Case((torch.randn(1, 1, 3, 2, generator=g), 4, 2)),  # shorter than a block
        Case((torch.randn(1, 2, 2, 2, generator=g), 4, 4)),  # no complete block yet
    ]


COMPRESSION_WINDOWS = Exercise(
    name="compression_windows",
    stage="02",
    hints=(
        (
            "x is (b, h, T, dh). The output (b, h, w, block_size, dh) holds w = T // stride "
            "blocks, each a window of block_size consecutive tokens."
        ),
        (
            "the rule: block j *ends* at token (j + 1) * stride - 1 and holds the block_size "
            "tokens up to there; positions before token 0 are zeros. Tokens after the last full "
            "stride belong to no block yet."
        ),
        (
            "a skeleton: keep x[..., : w * stride, :]; left-pad it with block_size - stride zero "
            "tokens (F.pad(x, (0, 0, ..., 0))); x.unfold(-2, block_size, stride) then gives (b, "
            "h, w, dh, block_size): swap the last two axes. Handle w == 0 (an empty result) first."
        ),
    ),
    spec=compression_windows_spec,
    make_cases=_window_cases,
    mistakes=(
        Mistake(
            "your blocks start at j * stride; they must *end* at (j + 1) * stride - 1, so the "
            "first blocks reach before token 0: left-pad with block_size - stride zeros.",
            _windows_from_start,
        ),
        Mistake(
            "the tokens after the last full stride belong to no block yet: use only the first "
            "(n // stride) * stride tokens.",
            _windows_with_partial,
        ),
    ),
)

# ---- compressed tokens, with the memory in front (Eq. 7) -----------------------------------


def compress_with_memory_spec(
    x: Tensor, positions: Tensor, mlp: nn.Module, memory: Tensor, block_size: int, stride: int
) -> Tensor:
    """x (b, h, T, dh) -> (b, h, m + w, dh): the m memory tokens (h, m, dh), then one token
    per block: the block's tokens (zeros before token 0) plus the positions (h, block_size,
    dh) of their slots, through the MLP, one block at a time."""
    windows = compression_windows_spec(x, block_size, stride)  # (b, h, w, block_size, dh)
    tokens = [memory[None, :, m].expand(x.shape[0], -1, -1) for m in range(memory.shape[1])]
    for j in range(windows.shape[2]):
        block = windows[:, :, j] + positions  # (b, h, block_size, dh): the padding gets them too
        tokens.append(mlp(block[:, :, None])[:, :, 0])  # the MLP takes (b, h, w, l, dh)
    if not tokens:
        return x.new_zeros(*x.shape[:2], 0, x.shape[-1])
    return torch.stack(tokens, dim=2)


def _compress_with(
    x, positions, mlp, memory, block_size, stride, *, with_positions=True, heads_aligned=True,
    memory_first=True, with_memory=True,
):  # fmt: skip
    """compress_with_memory with the keyword's step done wrong."""
    windows = compression_windows_spec(x, block_size, stride)  # (b, h, w, l, dh)
    if with_positions:
        # positions (h, l, dh) without [:, None] broadcast their heads against the blocks
        windows = windows + (positions[:, None] if heads_aligned else positions)
    compressed = mlp(windows)  # (b, h, w, dh)
    if not with_memory:
        return compressed
    memory = repeat(memory, "h m d -> b h m d", b=x.shape[0])
    parts = (memory, compressed) if memory_first else (compressed, memory)
    return torch.cat(parts, dim=2)


def _random_compress_mlp(block_size: int, dim_head: int, expand: float, seed: int) -> nn.Module:
    """The module's default compression MLP with seeded random weights."""
    from nsa_tutorial.compress import default_compress_mlp

    with torch.random.fork_rng(devices=[]):  # leave the notebook's random draws alone
        torch.manual_seed(seed)
        return default_compress_mlp(block_size, dim_head, expand)


def _compress_cases() -> list[Case]:
    g = torch.Generator().manual_seed(22)

    def case(b, h, n, dh, block, stride, m, expand=1.0, note=""):
        return Case(
            (
                torch.randn(b, h, n, dh, generator=g),
                torch.randn(h, block, dh, generator=g),
                _random_compress_mlp(block, dh, expand, seed=n),
                torch.randn(h, m, dh, generator=g),
                block,
                stride,
            ),
            note=note,
        )

    return [
        case(1, 2, 16, 3, 4, 4, 1),
        case(2, 3, 14, 2, 8, 4, 2, note="overlapping blocks, 2 tokens after the last stride"),
        case(1, 2, 5, 2, 4, 2, 1, expand=2.0, note="shorter than a block: padding in front"),
        case(1, 2, 3, 2, 4, 4, 3, note="no complete block yet: only the memory"),
    ]


COMPRESS_WITH_MEMORY = Exercise(
    name="compress_with_memory",
    stage="02",
    hints=(
        (
            "x is (b, h, T, dh), keys or values of h key/value heads. positions (h, block_size, "
            "dh) holds one learned vector per slot of a block, per head; mlp maps blocks (b, h, "
            "w, block_size, dh) to tokens (b, h, w, dh); memory (h, m, dh) holds m learned "
            "tokens per head. The output (b, h, m + w, dh) is the memory, then one token per block."
        ),
        (
            "the rule: cut x into blocks with your compression_windows (zeros before token 0), "
            "add the positions to every block (the padded slots get them too: the module "
            "adds them after padding), run the MLP, and put the memory tokens in front, the "
            "same m tokens for every batch element."
        ),
        (
            "a skeleton:\n"
            "    windows = compression_windows(...)  # (b, h, w, block_size, dh)\n"
            "    tokens = mlp(windows + positions[...])  # positions must line up with the heads\n"
            '    memory = repeat(memory, "h m d -> b h m d", b=...)\n'
            "    return torch.cat(..., dim=-2)"
        ),
    ),
    spec=compress_with_memory_spec,
    make_cases=_compress_cases,
    mistakes=(
        Mistake(
            "the intra-block positions are missing: add positions (one vector per slot, per "
            "head) to every block before the MLP.",
            lambda *a: _compress_with(*a, with_positions=False),
        ),
        Mistake(
            "positions (h, block_size, dh) added to blocks (b, h, w, block_size, dh) broadcast "
            "their heads against the blocks (axis w): index positions[:, None] to get (h, 1, "
            "block_size, dh), which lines up with the heads.",
            lambda *a: _compress_with(*a, heads_aligned=False),
        ),
        Mistake(
            "the memory tokens go in front of the compressed tokens, not after them: "
            "compressed_causal_mask (below) expects them in the first columns.",
            lambda *a: _compress_with(*a, memory_first=False),
        ),
        Mistake(
            "the memory tokens are missing: put the m memory tokens of each head in front.",
            lambda *a: _compress_with(*a, with_memory=False),
        ),
    ),
)

# ---- which compressed tokens a query sees --------------------------------------------------


def compressed_causal_mask_spec(
    seq_len: int, num_blocks: int, stride: int, num_memory: int
) -> Tensor:
    """(seq_len, num_memory + num_blocks): memory always visible; block j visible to
    query i once its last token (j + 1) * stride - 1 is strictly before i."""
    mask = torch.zeros(seq_len, num_memory + num_blocks, dtype=torch.bool)
    for i in range(seq_len):
        for m in range(num_memory):
            mask[i, m] = True
        for j in range(num_blocks):
            mask[i, num_memory + j] = (j + 1) * stride - 1 < i
    return mask


def _mask_with(visible, *, memory=True, with_memory_columns=True):
    def build(seq_len, num_blocks, stride, num_memory):
        queries = torch.arange(seq_len)[:, None]
        blocks = torch.arange(num_blocks)[None, :]
        mask = visible(queries, blocks, stride)
        if not with_memory_columns:
            return mask
        columns = torch.full((seq_len, num_memory), memory)
        return torch.cat((columns, mask), dim=-1)

    return build


COMPRESSED_CAUSAL_MASK = Exercise(
    name="compressed_causal_mask",
    stage="02",
    hints=(
        (
            "the output is (seq_len, num_memory + num_blocks), bool: row i is query i; the first "
            "num_memory columns are the memory tokens, then one column per compressed block."
        ),
        (
            "the rule: memory columns are always True. Block j covers tokens up to (j + 1) * "
            "stride - 1 and is visible to query i once it has ended: (j + 1) * stride - 1 < i, "
            "strictly."
        ),
        (
            "a skeleton:\n"
            "    queries = torch.arange(seq_len)[:, None]\n"
            "    block_ends = (torch.arange(num_blocks) + 1) * stride - 1\n"
            "    visible = ...  # (seq_len, num_blocks), by broadcasting\n"
            "    return torch.cat((memory_columns, visible), dim=-1)"
        ),
    ),
    spec=compressed_causal_mask_spec,
    make_cases=lambda: [
        Case((12, 3, 4, 1)),
        Case((20, 4, 4, 2)),
        Case((9, 4, 2, 1)),
        Case((3, 0, 4, 1)),
    ],
    mistakes=(
        Mistake(
            "off by one: a block becomes visible to the query *after* its last token, "
            "(j + 1) * stride - 1 < i, not <=.",
            _mask_with(lambda i, j, s: (j + 1) * s - 1 <= i),
        ),
        Mistake(
            "the memory tokens are missing: put num_memory always-visible columns first.",
            _mask_with(lambda i, j, s: (j + 1) * s - 1 < i, with_memory_columns=False),
        ),
        Mistake(
            "the memory tokens must always be visible (True), even to the first query.",
            _mask_with(lambda i, j, s: (j + 1) * s - 1 < i, memory=False),
        ),
        Mistake(
            "this compares the query with the block's first token of its stride; compare with "
            "its last token, (j + 1) * stride - 1.",
            _mask_with(lambda i, j, s: j * s < i),
        ),
    ),
)

# ---- compressed attention ---------------------------------------------------------------------


def compressed_attention_spec(
    q: Tensor, ck: Tensor, cv: Tensor, num_memory: int, stride: int, causal: bool
) -> Tensor:
    """q (b, hq, n, d) over ck, cv (b, hk, m + w, d): query head h reads key/value head
    h // (hq // hk); each query sees the memory and (if causal) the finished blocks."""
    hq, n, d = q.shape[1:]
    group = hq // ck.shape[1]
    num_blocks = ck.shape[-2] - num_memory
    if causal:
        mask = compressed_causal_mask_spec(n, num_blocks, stride, num_memory)
    else:
        mask = torch.ones(n, ck.shape[-2], dtype=torch.bool)
    out = torch.empty_like(q)
    for h in range(hq):
        keys, values = ck[:, h // group], cv[:, h // group]  # (b, m + w, d)
        for i in range(n):
            visible = mask[i]
            scores = torch.einsum("b d, b j d -> b j", q[:, h, i], keys[:, visible]) * d**-0.5
            out[:, h, i] = torch.einsum("b j, b j d -> b d", scores.softmax(-1), values[:, visible])
    return out


def _attention_with(
    q,
    ck,
    cv,
    num_memory,
    stride,
    causal,
    *,
    memory_as_blocks=False,
    softmax_dim=-1,
    scale=None,
    head_order="(h g)",
    softmax=None,
):
    group = q.shape[1] // ck.shape[1]
    ck, cv = (repeat(t, f"b h j d -> b {head_order} j d", g=group) for t in (ck, cv))
    scores = q @ ck.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        if memory_as_blocks:
            mask = compressed_causal_mask_spec(q.shape[-2], ck.shape[-2], stride, 0)
        else:
            mask = compressed_causal_mask_spec(
                q.shape[-2], ck.shape[-2] - num_memory, stride, num_memory
            )
        scores = scores.masked_fill(~mask, -1e30)
    weights = scores.softmax(softmax_dim) if softmax is None else softmax(scores, softmax_dim)
    return weights @ cv


def _attention_cases() -> list[Case]:
    g = torch.Generator().manual_seed(21)

    def case(b, hq, hk, n, m, w, d, causal, loud=1.0):
        return Case(
            (
                loud * torch.randn(b, hq, n, d, generator=g),
                torch.randn(b, hk, m + w, d, generator=g),
                torch.randn(b, hk, m + w, d, generator=g),
                m,
                4,
                causal,
            )
        )

    return [
        case(1, 2, 2, 13, 1, 3, 4, True),
        case(2, 4, 2, 9, 2, 2, 8, True),
        case(1, 4, 1, 17, 1, 4, 4, True),
        case(1, 2, 1, 6, 1, 1, 4, False),
        case(1, 4, 2, 14, 1, 3, 4, True, loud=100.0),  # scores in the hundreds
    ]


COMPRESSED_ATTENTION = Exercise(
    name="compressed_attention",
    stage="02",
    hints=(
        (
            "q is (b, hq, T, dh); ck and cv are (b, hk, num_memory + w, dh): the memory first, "
            "then one key and value per compressed block. Query head h reads key/value head h // "
            "(hq // hk). The output has the shape of q."
        ),
        (
            "the rule: plain softmax attention of each query over the compressed keys, scaled by "
            "dh ** -0.5; when causal, the columns compressed_causal_mask marks False get a very "
            "negative score before the softmax."
        ),
        (
            "a skeleton:\n"
            '    q = rearrange(q, "b (h g) i d -> b h g i d", g=hq // hk)\n'
            '    scores = torch.einsum("b h g i d, b h j d -> b h g i j", q, ck) * ...\n'
            "    if causal:\n"
            "        scores = scores.masked_fill(~compressed_causal_mask(...), ...)\n"
            "    out = torch.einsum(..., scores.softmax(dim=-1), cv)\n"
            "    return rearrange(out, ...)"
        ),
    ),
    spec=compressed_attention_spec,
    make_cases=_attention_cases,
    mistakes=(
        Mistake(
            "the memory tokens are treated as blocks: the first num_memory columns are memory "
            "(always visible), blocks come after them.",
            lambda *a: _attention_with(*a, memory_as_blocks=True),
        ),
        Mistake(
            "the softmax runs over queries (dim=-2); it must run over compressed keys (dim=-1).",
            lambda *a: _attention_with(*a, softmax_dim=-2),
        ),
        Mistake(
            "the scores are not scaled by dim_head ** -0.5.",
            lambda *a: _attention_with(*a, scale=1.0),
        ),
        Mistake(
            "query heads are matched to key/value heads the wrong way: query head h reads "
            "head h // group (einops '(h g)'), not h % kv_heads.",
            lambda *a: _attention_with(*a, head_order="(g h)"),
        ),
        Mistake(
            "no causal mask: a query may only see blocks that ended before it.",
            lambda q, ck, cv, m, s, causal: _attention_with(q, ck, cv, m, s, False),
        ),
        Mistake(HINT_OVERFLOW, lambda *a: _attention_with(*a, softmax=softmax_without_max)),
    ),
)

EXERCISES = [
    COMPRESSION_WINDOWS,
    COMPRESS_WITH_MEMORY,
    COMPRESSED_CAUSAL_MASK,
    COMPRESSED_ATTENTION,
]
