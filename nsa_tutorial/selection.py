"""Stage 04: block selection (paper §3.3.2, Eq. 11).

Each query keeps its top-n selection blocks by importance (`top_blocks`), skips those
whose importance is negligible, and attends to them at full resolution through
`nsa_tutorial.fine_attention`. With `use_diff_topk` the importance values also
become gates on the selected keys, so the importance scores learn from this branch.
"""

from __future__ import annotations

from torch import Tensor

from nsa_tutorial.fine_attention import FlexMaskBuilder, fine_attention

SELECTED_THRESHOLD = 1e-10  # blocks with importance at or below this are not attended


def top_blocks(importance: Tensor, num_selected: int) -> tuple[Tensor, Tensor]:
    """Top-n blocks per query from importance (b, h, i, w): (values, indices), (b, h, i, s).

    s = min(num_selected, w): early queries cannot pick more blocks than exist.
    """
    return importance.topk(min(num_selected, importance.shape[-1]), dim=-1)


def straight_through_gates(values: Tensor) -> Tensor:
    """Gates that are 1 in the forward pass but pass gradients to the importance values.

    With `use_diff_topk`, selected keys are multiplied by these, so the importance
    scores (and the compression MLP behind them) learn from the fine branch.
    """
    return values + (1.0 - values).detach()


def selection_branch(
    q: Tensor, k: Tensor, v: Tensor, values: Tensor, indices: Tensor, *, block_size: int,
    causal: bool, diff_topk: bool = False, scale: float | None = None, first_query: int = 0,
    flex_mask: FlexMaskBuilder | None = None, use_triton: bool = False,
) -> Tensor:  # fmt: skip
    """The selection branch: each query's top-n blocks (values, indices) (b, h, i, s), from
    `top_blocks`, -> fine attention.

    q (b, hq, i, d) holds the queries first_query, ... (a decoding step has one), k and
    v (b, hk, n, d) the rotated keys and values so far. Blocks whose importance is
    <= SELECTED_THRESHOLD are skipped; with diff_topk the importance values become
    straight-through gates. `flex_mask` and `use_triton` pick the path (see
    `fine_attention`).
    """
    return fine_attention(
        q, k, v, indices, values > SELECTED_THRESHOLD,
        block_size=block_size, causal=causal,
        gates=straight_through_gates(values) if diff_topk else None,
        scale=scale, first_query=first_query, flex_mask=flex_mask, use_triton=use_triton,
    )  # fmt: skip
