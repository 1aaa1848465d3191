"""Checks for notebook 09: the dq kernel and the inverted index that the dk, dv kernel walks.

- `dq_kernel`: the backward for q of notebook 08's selection kernel, one program per
  (token, batch * query head), given the forward's log-sum-exp and delta = do · o per
  row (`launch_dq_kernel` runs it; the notebook shows the same launcher);
- `invert_selection`: blocks -> the slots that read them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nsa_tutorial.course.stage08_triton_forward import (
    HINT_GQA_HEADS,
    kernel_as_function,
    selection_cases,
)
from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- the dq kernel ------------------------------------------------------------------------


def _keys_read(slots: list[int], i: int, n: int, block_size: int, causal: bool) -> list[int]:
    """The keys query i reads: its listed blocks (-1: none) and, when causal, j <= i of
    its own block."""
    keys = []
    for block in slots:
        if block >= 0:
            keys += range(block * block_size, min((block + 1) * block_size, n))
    if causal:
        keys += range(i // block_size * block_size, i + 1)
    return keys


def dq_kernel_spec(
    q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, do: Tensor, lse: Tensor, delta: Tensor,
    block_size: int, causal: bool,
) -> Tensor:  # fmt: skip
    """dq (b, hq, n, d) of notebook 08's selection attention. Over the keys j a query
    reads, s_j = scale * q · k_j, p_j = exp(s_j - lse), ds_j = p_j * (do · v_j - delta),
    and dq = scale * sum_j ds_j k_j; a query that reads no key gets zeros.

    q, do (b, hq, n, d); k, v (b, hk, n, d); blocks (b, hk, n, s), -1 = empty slot;
    lse, delta (b, hq, n): the forward's log-sum-exp of the scores and do · out.
    """
    b, hq, n, d = q.shape
    group, scale = hq // k.shape[1], d**-0.5
    dq = torch.zeros_like(q)
    for bi in range(b):
        for head in range(hq):
            kv = head // group
            for i in range(n):
                keys = _keys_read(blocks[bi, kv, i].tolist(), i, n, block_size, causal)
                if not keys:
                    continue
                p = (k[bi, kv, keys] @ q[bi, head, i] * scale - lse[bi, head, i]).exp()
                ds = p * (v[bi, kv, keys] @ do[bi, head, i] - delta[bi, head, i])
                dq[bi, head, i] = scale * ds @ k[bi, kv, keys]
    return dq


def forward_statistics(q, k, v, blocks, do, block_size: int, causal: bool):
    """(lse, delta), each (b, hq, n): what the forward kernel saves for the backward, the
    log-sum-exp of each query's scores (-inf without keys) and do · out."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    lse, delta = torch.full((b, hq, n), -math.inf), torch.zeros(b, hq, n)
    for bi in range(b):
        for head in range(hq):
            kv = head // group
            for i in range(n):
                keys = _keys_read(blocks[bi, kv, i].tolist(), i, n, block_size, causal)
                if keys:
                    scores = k[bi, kv, keys] @ q[bi, head, i] * d**-0.5
                    out = scores.softmax(-1) @ v[bi, kv, keys]
                    lse[bi, head, i] = scores.logsumexp(-1)
                    delta[bi, head, i] = out @ do[bi, head, i]
    return lse, delta


def launch_dq_kernel(kernel, q, k, v, blocks, do, lse, delta, block_size: int, causal: bool):
    """Run `kernel` with one program per (token, batch * query head) -> dq (b, hq, n, d)."""
    b, hq, n, d = q.shape
    hk, num_slots = k.shape[1], blocks.shape[-1]
    q, k, v, blocks, do, lse, delta = (t.contiguous() for t in (q, k, v, blocks, do, lse, delta))
    dq = torch.empty_like(q)
    grid = (n, b * hq)  # program (i, bh) computes dq[b, h, i, :] with bh = b * hq + h
    kernel[grid](
        q, k, v, blocks, do, lse, delta, dq,
        n, hq, hk, num_slots, d**-0.5,
        BLOCK_SIZE=block_size, D=d, CAUSAL=causal,
    )  # fmt: skip
    return dq


def _dq_cases() -> list[Case]:
    """Notebook 08's selection cases (partial blocks, GQA, empty slots, rows without any
    key, scores in the hundreds), each with a random do and the forward's statistics."""
    g = torch.Generator().manual_seed(91)
    cases = []
    for case in selection_cases():
        q, k, v, blocks, block_size, causal = case.args
        do = torch.randn(q.shape, generator=g)
        lse, delta = forward_statistics(q, k, v, blocks, do, block_size, causal)
        cases.append(Case((q, k, v, blocks, do, lse, delta, block_size, causal)))
    return cases


def _dq_walk(
    q, k, v, blocks, do, lse, delta, block_size, causal, *, own_block="causal", kv_of=None,
    empty_slot=None, final_scale=True, use_delta=True, normalise=True,
):  # fmt: skip
    """The kernel's walk in PyTorch, block by block over padded k, v; each keyword
    reproduces one mistake, the defaults give the spec's answer."""
    b, hq, n, d = q.shape
    hk, scale = k.shape[1], d**-0.5
    kv_of = kv_of or (lambda head, hq, hk: head // (hq // hk))
    k, v = (F.pad(t, (0, 0, 0, -n % block_size)) for t in (k, v))
    lanes = torch.arange(block_size)
    dq = torch.zeros_like(q)
    for bi in range(b):
        for head in range(hq):
            kv = kv_of(head, hq, hk)
            for i in range(n):
                walk = []
                for block in blocks[bi, kv, i].tolist():
                    block = empty_slot if block < 0 and empty_slot is not None else block
                    if block >= 0:
                        keys = block * block_size + lanes
                        walk.append((keys, keys < n))
                if causal and own_block != "none":
                    keys = i // block_size * block_size + lanes
                    walk.append((keys, keys <= i if own_block == "causal" else keys < n))
                for keys, visible in walk:
                    s = k[bi, kv, keys] @ q[bi, head, i] * scale
                    p = (s - (lse[bi, head, i] if normalise else 0.0)).exp() * visible
                    dp = v[bi, kv, keys] @ do[bi, head, i]
                    ds = p * (dp - delta[bi, head, i] if use_delta else dp)
                    dq[bi, head, i] += ds @ k[bi, kv, keys]
    return dq * scale if final_scale else dq


def _dq_with(**mistake) -> Callable[..., Tensor]:
    return lambda *args: _dq_walk(*args, **mistake)


DQ_KERNEL = Exercise(
    name="dq_kernel",
    stage="09",
    hints=(
        (
            "program (i, bh) writes dq[b, h, i, :] for one query, bh = b * num_heads + h, "
            "laid out as notebook 08's selection kernel: q, do and dq rows start at "
            "(bh * n + i) * D, lse and delta at bh * n + i; key j of the (batch, kv head) "
            "row kv = b * num_kv_heads + h // (num_heads // num_kv_heads) at (kv * n + j) * D; "
            "the slots at BLOCKS + (kv * n + i) * num_slots."
        ),
        (
            "the rule: walk the same keys as the forward (listed blocks, skipping -1, keys "
            "< n; then, if CAUSAL, the own block up to i). For each tile: s = scale * k·q, "
            "p = exp(s - lse) (the forward's probabilities, no running max needed: "
            "s <= lse), dp = v·do, ds = p * (dp - delta), dq += sum of ds * k. Masked "
            "lanes must get p = 0. At the end store scale * dq."
        ),
        (
            "a skeleton:\n"
            "    q = tl.load(Q + ...); do = tl.load(DO + ...)\n"
            "    lse = tl.load(LSE + bh * n + i); delta = ...\n"
            "    dq = tl.zeros((D,), tl.float32)\n"
            "    for slot in range(num_slots):\n"
            "        block = tl.load(BLOCKS + ...)\n"
            "        if block >= 0:\n"
            "            ...  # keys, visible, k and v tiles as in notebook 08\n"
            '            s = tl.where(visible, ... * scale, float("-inf"))\n'
            "            p = tl.exp(s - lse)  # 0 where masked\n"
            "            ds = p * (tl.sum(v * do[None, :], 1) - delta)\n"
            "            dq += ...\n"
            "    # the own block the same way, then tl.store(DQ + ..., dq * ...)"
        ),
    ),
    spec=dq_kernel_spec,
    make_cases=_dq_cases,
    prepare=lambda candidate: kernel_as_function(candidate, launch_dq_kernel, 7),
    mistakes=(
        Mistake(
            "the scale is missing at the end: s = scale * q·k, so dq = scale * sum_j ds_j k_j.",
            _dq_with(final_scale=False),
        ),
        Mistake(
            "delta is missing: ds_j = p_j * (dp_j - delta), where delta = do · out is the "
            "softmax's own share of the gradient.",
            _dq_with(use_delta=False),
        ),
        Mistake(
            "p is not normalised: p_j = exp(s_j - lse), the forward's probabilities; exp(s_j) "
            "alone is off by the softmax's sum and overflows for scores in the hundreds.",
            _dq_with(normalise=False),
        ),
        Mistake(
            "the own block is missing: when CAUSAL, query i also read keys "
            "i // BLOCK_SIZE * BLOCK_SIZE .. i, so they add to dq too.",
            _dq_with(own_block="none"),
        ),
        Mistake(
            "the own block sees the future: mask its keys to j <= i, as the forward did.",
            _dq_with(own_block="whole"),
        ),
        Mistake(HINT_GQA_HEADS, _dq_with(kv_of=lambda head, hq, hk: head % hk)),
        Mistake(
            "an empty slot (-1) is read as block 0: skip slots whose block is negative.",
            _dq_with(empty_slot=0),
        ),
    ),
    atol=1e-4,
    rtol=1e-4,
)

# ---- the inverted index -------------------------------------------------------------------


def invert_selection_spec(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """blocks (b, h, n, s), -1 for an empty slot -> (entries, offsets), both int32.

    Number the slots of each batch-head p = t * s + slot. entries lists, for each
    batch-head bh and each block j in turn, the slots p that read block j, in increasing
    p; the empty slots come last. Block j of bh owns entries[offsets[bh * num_blocks + j]
    : offsets[bh * num_blocks + j + 1]]; offsets starts at 0 and has b * h * num_blocks + 1
    numbers.
    """
    per_head = blocks.reshape(blocks.shape[0] * blocks.shape[1], -1).tolist()
    entries, offsets, empty = [], [0], []
    for slots in per_head:
        for j in range(num_blocks):
            entries += [p for p, block in enumerate(slots) if block == j]
            offsets.append(len(entries))
        empty += [p for p, block in enumerate(slots) if block < 0]
    entries = torch.tensor(entries + empty, dtype=torch.int32)
    return entries, torch.tensor(offsets, dtype=torch.int32)


def _cases() -> list[Case]:
    g = torch.Generator().manual_seed(90)

    def case(b, h, n, s, num_blocks):
        blocks = torch.randint(-1, num_blocks, (b, h, n, s), generator=g, dtype=torch.int32)
        return Case((blocks, num_blocks))

    return [case(1, 1, 6, 2, 3), case(2, 3, 5, 3, 4), case(1, 2, 9, 4, 5)]


def _slot_major(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """Readers listed slot by slot (all tokens' slot 0, then slot 1, ...)."""
    b, h, n, s = blocks.shape
    swapped = blocks.transpose(-1, -2).reshape(b, h, n * s)
    entries, offsets = invert_selection_spec(swapped[..., None], num_blocks)
    return (entries % n) * s + entries // n, offsets  # slot-major number -> t * s + slot


def _empty_as_last_block(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """-1 read as Python's "last": empty slots counted as readers of the last block."""
    return invert_selection_spec(torch.where(blocks < 0, num_blocks - 1, blocks), num_blocks)


def _tokens_not_slots(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    entries, offsets = invert_selection_spec(blocks, num_blocks)
    return entries // blocks.shape[-1], offsets


def _no_leading_zero(blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    entries, offsets = invert_selection_spec(blocks, num_blocks)
    return entries, offsets[1:]


INVERT_SELECTION = Exercise(
    name="invert_selection",
    stage="09",
    hints=(
        (
            "blocks is (b, h, n, s): slot `slot` of token t reads block blocks[bi, hi, t, slot], "
            "or nothing (-1). Number the slots of each batch-head p = t * s + slot. Return "
            "entries (every slot once) and offsets (b * h * num_blocks + 1 numbers), both int32."
        ),
        (
            "the rule: a compressed sparse index. Give block j of batch-head bh the key bh * "
            "num_blocks + j; entries[offsets[key] : offsets[key + 1]] lists the slots p that "
            "read it, in increasing p; the empty slots come after all blocks; offsets starts at 0."
        ),
        (
            "a skeleton:\n"
            '    per_head = rearrange(blocks, "b h n s -> (b h) (n s)").long()\n'
            "    key = torch.where(per_head >= 0, per_head + bh * num_blocks, b * h * num_blocks)\n"
            "    order = torch.argsort(key.flatten(), stable=True)\n"
            "    entries = order % (n * s)  # a flat position back to p within its batch-head\n"
            "    counts = torch.bincount(key.flatten(), minlength=...)[:-1]\n"
            "    offsets = torch.cat((a zero, counts.cumsum(0)))  # then .int() both"
        ),
    ),
    spec=invert_selection_spec,
    make_cases=_cases,
    mistakes=(
        Mistake(
            "list each block's readers in increasing t * s + slot (a stable sort keeps that "
            "order), not slot by slot.",
            _slot_major,
        ),
        Mistake(
            "an empty slot (-1) reads no block: as an index, -1 means the last block.",
            _empty_as_last_block,
        ),
        Mistake(
            "an entry is the slot's position t * s + slot, not the token t: the kernel needs "
            "the slot to find its gate.",
            _tokens_not_slots,
        ),
        Mistake(
            "offsets starts with a 0 (the first block's readers start at entry 0), so it has "
            "b * h * num_blocks + 1 numbers.",
            _no_leading_zero,
        ),
    ),
)

EXERCISES = [DQ_KERNEL, INVERT_SELECTION]
