"""Checks for notebook 09: the inverted index that the dk, dv kernel walks."""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake


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

EXERCISES = [INVERT_SELECTION]
