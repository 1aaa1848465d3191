"""Checks for notebook 07: the running buffer and the single-token selection."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.stage00_welcome import HINT_OVERFLOW, softmax_without_max
from nsa_tutorial.course.verdict import Case, Exercise, Mistake


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

EXERCISES = [UPDATE_RUNNING_BUFFER, SINGLE_TOKEN_SELECTION]
