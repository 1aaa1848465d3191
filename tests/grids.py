"""The SparseAttention configurations that the parity and decoding tests sweep.

One builder, `sparse_attention_grid`, crosses the axes below; each test module takes
its grid from here, so a new axis or value reaches every test that should see it.
Sizes are tiny (dim_head 8) so that hundreds of configurations run in seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

HEADS = [(2, 2), (4, 2), (4, 1)]  # (heads, kv_heads): one query head per kv head, GQA, MQA
COMPRESSION = [(4, 4), (8, 4), (4, 2)]  # (compress_block_size, stride): plain, overlapping
NUM_SELECTED = [0, 2]  # 0: the own block only
# the importance mappings (stride, selection_block, interpolate) that the top-n tests
# cross: remapped, equal, interpolated, selection blocks smaller than the stride
IMPORTANCE_CASES = [(4, 4, False), (4, 8, False), (2, 8, False), (4, 6, True), (4, 3, True),
                    (8, 4, True)]  # fmt: skip
# (selection_block_size, interpolated_importance_score) for a compression stride
Selection = Callable[[int], Iterable[tuple[int, bool]]]


def multiples_of_stride(*multiples: int) -> Selection:
    """Selection blocks of stride * m, by repetition (what the reference supports)."""
    return lambda stride: [(stride * m, False) for m in multiples]


def sparse_attention_grid(
    *,
    window: int,
    selection: Selection,
    causal: Iterable[bool] = (True, False),
    keep: Callable[[dict], bool] = lambda config: True,
    dim: int | None = 16,
) -> list[dict]:
    """SparseAttention keyword arguments for every combination of the axes that `keep`
    accepts. `dim=None` leaves dim out (the caller derives it). The interpolation
    flag is passed only when some selection uses it (the reference lacks it)."""
    configs = []
    for is_causal, (heads, kv_heads), (
        block,
        stride,
    ), num_selected, diff, shared in itertools.product(
        causal, HEADS, COMPRESSION, NUM_SELECTED, (False, True), (True, False)
    ):
        for selection_block, interpolate in selection(stride):
            config = dict(
                dim=dim,
                dim_head=8,
                heads=heads,
                kv_heads=kv_heads,
                sliding_window_size=window,
                compress_block_size=block,
                compress_block_sliding_stride=stride,
                selection_block_size=selection_block,
                num_selected_blocks=num_selected,
                causal=is_causal,
                use_diff_topk=diff,
                query_heads_share_selected_kv=shared,
                interpolated_importance_score=interpolate,
            )
            if dim is None:
                del config["dim"]
            if not any(interpolate for _, interpolate in selection(stride)):
                del config["interpolated_importance_score"]
            if keep(config):
                configs.append(config)
    return configs


def config_id(config: dict) -> str:
    """A short readable test id, e.g. causal-h4kv2-cmp8s4-sel8x2-diff-own-interp."""
    return (
        f"{'causal' if config['causal'] else 'full'}-h{config['heads']}kv{config['kv_heads']}-"
        f"cmp{config['compress_block_size']}s{config['compress_block_sliding_stride']}-"
        f"sel{config['selection_block_size']}x{config['num_selected_blocks']}"
        + ("-diff" if config["use_diff_topk"] else "")
        + ("" if config["query_heads_share_selected_kv"] else "-own")
        + ("-interp" if config.get("interpolated_importance_score") else "")
    )


def _diff_topk_is_causal(config: dict) -> bool:
    """The reference's diff-topk gates exist only when causal."""
    return config["causal"] or not config["use_diff_topk"]


def _module_parity(config: dict) -> bool:
    """Shared selection with one query head per kv head is per-head selection: once."""
    same_as_per_head = (
        config["query_heads_share_selected_kv"]
        and config["heads"] == config["kv_heads"]
        and not config["use_diff_topk"]
    )
    return _diff_topk_is_causal(config) and not same_as_per_head


def _branch_parity(config: dict) -> bool:
    """Selection blocks of 4 strides only with more than two heads (time)."""
    four_strides = config["selection_block_size"] == 4 * config["compress_block_sliding_stride"]
    return _diff_topk_is_causal(config) and not (four_strides and config["heads"] == 2)


def _decodable(config: dict) -> bool:
    """Selection blocks that are not a multiple of the stride need interpolation; per-head
    selection with one query head per kv head is shared selection: once."""
    divides = config["selection_block_size"] % config["compress_block_sliding_stride"] == 0
    per_head_same = (
        config["heads"] == config["kv_heads"] and not config["query_heads_share_selected_kv"]
    )
    return (divides or config["interpolated_importance_score"]) and not per_head_same


# The assembled module against the reference: outputs and gradients (test_attention.py).
MODULE_PARITY = sparse_attention_grid(
    window=3, selection=multiples_of_stride(1, 3, 4), keep=_module_parity
)

# The compressed and selected branches against the reference (test_reference_branches.py).
BRANCH_PARITY = sparse_attention_grid(
    window=4, selection=multiples_of_stride(1, 2, 4), dim=None, keep=_branch_parity
)

# Decoding against the full forward (test_cache.py): causal, any selection block.
DECODING = sparse_attention_grid(
    window=3,
    causal=(True,),
    selection=lambda stride: [(4, False), (8, False), (6, True), (3, True)],
    keep=_decodable,
)
