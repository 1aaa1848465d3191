"""Checks for notebook 07: the running buffer, the single-token selection, and a whole
decoding step, checked against the parallel forward."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nsa_tutorial.course.stage00_welcome import HINT_OVERFLOW, softmax_without_max
from nsa_tutorial.course.verdict import Case, Exercise, Mistake
from nsa_tutorial.gqa import attend

if TYPE_CHECKING:
    from nsa_tutorial.attention import SparseAttention
    from nsa_tutorial.cache import Cache


def update_running_buffer_spec(
    running: Tensor, new: Tensor, block_size: int, stride: int
) -> tuple[Tensor | None, Tensor]:
    """Append the new token; with block_size tokens, hand them out as a block and keep
    the last block_size - stride of them."""
    buffer = torch.cat((running, new), dim=-2)
    if buffer.shape[-2] != block_size:
        return None, buffer
    keep = block_size - stride
    return buffer, buffer[..., block_size - keep :, :]


def _buffer_cases() -> list[Case]:
    g = torch.Generator().manual_seed(70)

    def case(r, block, stride):
        return Case(
            (
                torch.randn(1, 2, r, 3, generator=g),
                torch.randn(1, 2, 1, 3, generator=g),
                block,
                stride,
            )
        )

    return [case(2, 4, 4), case(3, 4, 4), case(7, 8, 4), case(5, 8, 4), case(3, 4, 2)]


def _buffer_with(running, new, block, stride, *, keep=None, full_at=None):
    buffer = torch.cat((running, new), dim=-2)
    if buffer.shape[-2] != (block if full_at is None else full_at):
        return None, buffer
    kept = block - stride if keep is None else keep
    return buffer, buffer[..., buffer.shape[-2] - kept :, :]


UPDATE_RUNNING_BUFFER = Exercise(
    name="update_running_buffer",
    stage="07",
    hints=(
        (
            "running is (b, h, r, d), the tokens waiting for their compression block; new is (b, "
            "h, 1, d), the newest token. Return (block or None, buffer): a full block (b, h, "
            "block_size, d) when one completes, and the tokens that wait on."
        ),
        (
            "the rule: append the new token. With fewer than block_size tokens, no block yet and "
            "the buffer is all of them. With block_size tokens, hand them out as a block and "
            "keep the last block_size - stride of them: the overlap the next block shares."
        ),
        (
            "a skeleton:\n"
            "    buffer = torch.cat(..., dim=-2)  # (b, h, r + 1, d)\n"
            "    if ...:  # not a full block yet\n"
            "        return None, ...\n"
            "    return buffer, buffer[..., ...:, :]  # which tokens stay?"
        ),
    ),
    spec=update_running_buffer_spec,
    make_cases=_buffer_cases,
    mistakes=(
        Mistake(
            "after compressing, keep the last block_size - stride tokens: the next block "
            "shares them when blocks overlap.",
            lambda r, n, b, s: _buffer_with(r, n, b, s, keep=0),
        ),
        Mistake(
            "a block is full at block_size tokens, not at stride tokens.",
            lambda r, n, b, s: _buffer_with(r, n, b, s, full_at=s),
        ),
    ),
)


def single_token_selection_spec(
    q: Tensor, k: Tensor, v: Tensor, importance: Tensor, num_selected: int, block: int
) -> Tensor:
    """The newest token (position n - 1) attends to its top-n past blocks with
    importance > 1e-10 and to its own block up to itself."""
    return _single_token(q, k, v, importance, num_selected, block)


def _single_token(
    q, k, v, importance, num_selected, block, *, own_block=True, head_of=None, softmax=None
):
    """The loop of the spec; each keyword reproduces one mistake (head_of(head, hq, h)
    gives the importance or key/value head that query head `head` reads)."""
    head_of = head_of or (lambda head, hq, h: head // (hq // h))
    b, hq, _, d = q.shape
    n, h = k.shape[-2], importance.shape[1]
    position = n - 1
    out = torch.empty_like(q)
    count = min(num_selected, importance.shape[-1])
    for bi in range(b):
        for head in range(hq):
            scores = importance[bi, head_of(head, hq, h), 0]
            order = scores.sort(descending=True, stable=True).indices[:count].tolist()
            keys = set(range(position // block * block, position + 1)) if own_block else set()
            for index in order:
                if scores[index] > 1e-10 and index < position // block:
                    keys |= set(range(index * block, (index + 1) * block))
            keys = sorted(keys or {position})
            kv = head_of(head, hq, k.shape[1])
            logits = k[bi, kv, keys] @ q[bi, head, 0] * d**-0.5
            weights = logits.softmax(-1) if softmax is None else softmax(logits)
            out[bi, head, 0] = weights @ v[bi, kv, keys]
    return out


def _selection_cases() -> list[Case]:
    g = torch.Generator().manual_seed(71)

    def case(hq, hk, h, n, block, s, blocks_visible, loud=1.0):
        q = loud * torch.randn(1, hq, 1, 4, generator=g)
        k, v = torch.randn(2, 1, hk, n, 4, generator=g).unbind(0)
        importance = torch.rand(1, h, 1, blocks_visible, generator=g)
        importance[..., 0] = 0.0  # one block below the threshold
        return Case((q, k, v, importance, s, block))

    return [
        case(2, 2, 2, 13, 4, 2, 3),
        case(4, 2, 2, 16, 4, 5, 3),
        case(4, 1, 4, 9, 2, 2, 4),
        # GQA with fewer picks than blocks: each kv head's importance picks other blocks
        case(4, 2, 2, 18, 4, 2, 4),
        case(4, 2, 2, 11, 2, 3, 5, loud=100.0),  # scores in the hundreds
    ]


SINGLE_TOKEN_SELECTION = Exercise(
    name="single_token_selection",
    stage="07",
    hints=(
        (
            "q is (b, hq, 1, d): the newest token, at position n - 1; k and v are (b, hk, n, d); "
            "importance is (b, h, 1, w) with h = hk or hq: one score per past selection block. "
            "The output is (b, hq, 1, d)."
        ),
        (
            "the rule: query head h looks at importance head h // (hq // h_imp), takes its top "
            "min(num_selected, w) blocks, keeps those with importance > 1e-10 that lie before "
            "its own block (n - 1) // block, and attends to their keys plus its own block up to "
            "itself, reading key/value head h // (hq // hk)."
        ),
        (
            "a skeleton:\n"
            "    values, indices = importance.topk(count, dim=-1)\n"
            "    chosen = (values > 1e-10) & (indices < own)\n"
            "    key_block = torch.arange(n) // block\n"
            "    visible = ((key_block == indices[..., None]) & chosen[..., None]).any(...)\n"
            "    visible = visible | (key_block == own)\n"
            "then repeat visible, k, v to hq heads and take a masked softmax over the n keys."
        ),
    ),
    spec=single_token_selection_spec,
    make_cases=_selection_cases,
    mistakes=(
        Mistake(
            "the own block is missing: the newest token also reads its own block up to itself.",
            lambda *a: _single_token(*a, own_block=False),
        ),
        Mistake(
            "blocks with importance <= 1e-10 must be skipped.",
            lambda q, k, v, imp, s, b: single_token_selection_spec(q, k, v, imp + 1.0, s, b),
        ),
        Mistake(
            "query heads are matched to importance and key/value heads the wrong way: query "
            "head h reads head h // (hq // heads), the heads of a GQA group are neighbours, "
            "not h % heads.",
            lambda *a: _single_token(*a, head_of=lambda head, hq, h: head % h),
        ),
        Mistake(HINT_OVERFLOW, lambda *a: _single_token(*a, softmax=softmax_without_max)),
    ),
)


# ---- one decoding step, checked against the parallel forward ----------------------------------


def decode_step_spec(attn: SparseAttention, prefix: Tensor, tokens: Tensor) -> tuple[Tensor, Cache]:
    """The parallel forward over prefix (b, p, dim) and tokens (b, k, dim) together: the
    outputs of the k new tokens (b, k, dim), and the cache a prefill of the whole sequence
    leaves. Decoding the tokens one at a time after a prefill of the prefix must give both."""
    with torch.no_grad():
        out, cache = attn(torch.cat((prefix, tokens), dim=1), return_cache=True)
    return out[:, prefix.shape[1] :], cache


def decode_all(decode_step: Any) -> Any:
    """The learner's decode_step(attn, inp, cache) -> (out, cache) as a function of the
    spec's signature: prefill the prefix with the module, then decode the tokens one at a
    time, each step with the cache the previous step returned. What already has the
    spec's signature (a known mistake) or is no function is checked as it is."""
    if not callable(decode_step) or getattr(decode_step, "decodes_all_tokens", False):
        return decode_step

    def decode(attn: SparseAttention, prefix: Tensor, tokens: Tensor) -> tuple[Tensor, Any]:
        with torch.no_grad():
            _, cache = attn(prefix, return_cache=True)
            outputs = []
            for t in range(tokens.shape[1]):
                out, cache = decode_step(attn, tokens[:, t : t + 1], cache)
                outputs.append(out)
        return torch.cat(outputs, dim=1), cache

    decode.decodes_all_tokens = True
    return decode


def _decode_with(
    attn, inp, cache, *, rotate_at_zero=False, compress_with_stride=False, cache_rotated=True,
    compressed_first_query=True, selected_first_query=True, short_window=False,
    append_compressed=True,
):  # fmt: skip
    """One decoding step (as nsa_tutorial.cache.decode_step), the keyword's part done wrong."""
    (cache_k, cache_v), ((ck, cv), (run_k, run_v)) = cache
    position = cache_k.shape[-2]
    block, stride = attn.compress_block_size, attn.compress_block_sliding_stride
    x = attn.norm(inp)
    q, k, v = attn.project_heads(x)  # (b, h, 1, dh), (b, kv_heads, 1, dh)
    k_block, run_k = update_running_buffer_spec(run_k, k, block, stride)
    v_block, run_v = update_running_buffer_spec(run_v, v, block, stride)
    if k_block is not None and append_compressed:
        window_stride = stride if compress_with_stride else block
        new_k, new_v = attn.compressed_tokens(k_block, v_block, stride=window_stride)
        ck, cv = torch.cat((ck, new_k), dim=-2), torch.cat((cv, new_v), dim=-2)
    compressed, top = attn.compressed_branch(
        q, ck, cv, first_query=position if compressed_first_query else 0
    )
    offset = 0 if rotate_at_zero else position
    rotated_q = attn.rotary_emb.rotate_queries_or_keys(q, offset=offset)
    rotated_k = attn.rotary_emb.rotate_queries_or_keys(k, offset=offset)
    keys, values = torch.cat((cache_k, rotated_k), dim=-2), torch.cat((cache_v, v), dim=-2)
    selected = attn.selected_branch(
        rotated_q, keys, values, top, first_query=position if selected_first_query else 0
    )
    first = max(position - attn.sliding_window_size + short_window, 0)
    sliding, _ = attend(rotated_q, keys[..., first:, :], values[..., first:, :], scale=attn.scale)
    out = attn.combine(x, compressed, selected, sliding)
    cached_keys = keys if cache_rotated else torch.cat((cache_k, k), dim=-2)
    return out, ((cached_keys, values), ((ck, cv), (run_k, run_v)))


def _decoded(**mistake: Any) -> Any:
    """A mistake of the decoding step as a function of the spec's signature."""
    return decode_all(lambda attn, inp, cache: _decode_with(attn, inp, cache, **mistake))


DECODE_CONFIGS = [
    dict(heads=2, sliding_window_size=3, compress_block_size=4, selection_block_size=4,
         num_selected_blocks=2, causal=True),
    dict(heads=4, kv_heads=2, sliding_window_size=5, compress_block_size=8,
         compress_block_sliding_stride=4, selection_block_size=8, num_selected_blocks=2,
         num_compressed_mem_kv=2, causal=True),
    dict(heads=4, kv_heads=2, sliding_window_size=4, compress_block_size=4,
         selection_block_size=6, num_selected_blocks=2, causal=True,
         interpolated_importance_score=True, query_heads_share_selected_kv=False),
    dict(heads=4, kv_heads=2, sliding_window_size=2, compress_block_size=4,
         compress_block_sliding_stride=2, selection_block_size=4, num_selected_blocks=1,
         causal=True),
]  # fmt: skip


def _decode_cases() -> list[Case]:
    from nsa_tutorial.course.stage06_gating_assembly import _config_note, random_sparse_attention

    g = torch.Generator().manual_seed(72)
    lengths = [(6, 7), (13, 8), (9, 6), (1, 9)]  # (prefill, new tokens): across block ends
    return [
        Case(
            (
                random_sparse_attention(70 + number, **config),
                torch.randn(2, prefill, 16, generator=g),
                torch.randn(2, new, 16, generator=g),
            ),
            note=_config_note(config),
        )
        for number, (config, (prefill, new)) in enumerate(zip(DECODE_CONFIGS, lengths, strict=True))
    ]


DECODE_STEP = Exercise(
    name="decode_step",
    stage="07",
    hints=(
        (
            "inp is (b, 1, dim), the token at position t = the number of cached tokens; cache "
            "is ((k, v), ((ck, cv), (run_k, run_v))): k rotated and v (b, kv_heads, t, dh), the "
            "compressed ck, cv (b, kv_heads, t // stride, dh), the unrotated running buffer. "
            "Return (out (b, 1, dim), the same structure one token longer). attn's methods do "
            "the work: norm, project_heads, compressed_tokens, compressed_branch, "
            "selected_branch, combine, and attn.rotary_emb.rotate_queries_or_keys."
        ),
        (
            "the rule: project the normed token; push its unrotated k, v through your "
            "update_running_buffer, and when a block comes out, compress it as one window "
            "(stride=block_size) and append it to ck, cv. Every branch runs for the query at "
            "position t (first_query=t, rotary offset=t). Append the rotated key and the value "
            "to the cache; the window is the last sliding_window_size + 1 keys, this one "
            "included."
        ),
        (
            "a skeleton:\n"
            "    (cache_k, cache_v), ((ck, cv), (run_k, run_v)) = cache\n"
            "    t = cache_k.shape[-2]\n"
            "    x = ...; q, k, v = ...\n"
            "    k_block, run_k = update_running_buffer(...)  # the same for v\n"
            "    if k_block is not None:\n"
            "        ...  # compress, then torch.cat onto ck and cv\n"
            "    compressed, top = attn.compressed_branch(q, ck, cv, first_query=...)\n"
            "    q, k = ...  # rotated at position t\n"
            "    keys, values = ...  # the cache plus this token\n"
            "    selected = attn.selected_branch(q, keys, values, top, first_query=...)\n"
            "    sliding, _ = attend(q, keys[..., ...:, :], values[..., ...:, :])\n"
            "    return attn.combine(...), ((keys, values), ((ck, cv), (run_k, run_v)))"
        ),
    ),
    spec=decode_step_spec,
    make_cases=_decode_cases,
    prepare=decode_all,
    # a step and the parallel forward sum in different orders: float32 rounding, no more
    atol=1e-4,
    rtol=1e-4,
    mistakes=(
        Mistake(
            "the new query and key are rotated at position 0: rotate them at their position, "
            "rotate_queries_or_keys(q, offset=t), t the number of cached tokens.",
            _decoded(rotate_at_zero=True),
        ),
        Mistake(
            "the block that the running buffer hands out is one window: compress it with "
            "stride=block_size (attn.compressed_tokens(k_block, v_block, stride=...)); with "
            "the sliding stride it is cut into overlapping windows again.",
            _decoded(compress_with_stride=True),
        ),
        Mistake(
            "the cache must keep the keys rotated, each at its own position: append the "
            "rotated key, not the unrotated one.",
            _decoded(cache_rotated=False),
        ),
        Mistake(
            "the compressed branch runs as if the query were token 0: pass first_query=t, so "
            "that it sees the blocks that ended before t.",
            _decoded(compressed_first_query=False),
        ),
        Mistake(
            "the selected branch runs as if the query were token 0: pass first_query=t, so "
            "that its own block is block t // selection_block_size.",
            _decoded(selected_first_query=False),
        ),
        Mistake(
            "the window is one key short: it holds sliding_window_size + 1 keys, from "
            "t - sliding_window_size to t.",
            _decoded(short_window=True),
        ),
        Mistake(
            "the compressed cache does not grow: when a block completes, append its "
            "compressed key and value to ck and cv.",
            _decoded(append_compressed=False),
        ),
    ),
)

EXERCISES = [UPDATE_RUNNING_BUFFER, SINGLE_TOKEN_SELECTION, DECODE_STEP]
