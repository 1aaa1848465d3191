"""The compressed and selected branches built from stages 02-04 equal the reference's,
float32, atol 1e-5, across configurations and awkward sequence lengths."""

import contextlib
import io
import itertools

import pytest
import torch
from reference_branches import our_branches, reference_branch

from nsa_tutorial import selection

CONFIGS = [
    dict(
        heads=heads,
        kv_heads=kv_heads,
        dim_head=8,
        sliding_window_size=4,
        compress_block_size=block,
        compress_block_sliding_stride=stride,
        selection_block_size=stride * multiple,
        num_selected_blocks=num_selected,
        causal=causal,
        use_diff_topk=diff_topk,
        query_heads_share_selected_kv=shared,
    )
    for causal, (heads, kv_heads), (
        block,
        stride,
    ), multiple, num_selected, diff_topk, shared in itertools.product(
        [True, False],
        [(2, 2), (4, 2), (4, 1)],
        [(4, 4), (8, 4), (4, 2)],
        [1, 2, 4],
        [0, 2],
        [False, True],
        [True, False],
    )
    if not (diff_topk and not causal) and not (multiple == 4 and heads == 2)
]


def config_id(c):
    return (
        f"{'causal' if c['causal'] else 'full'}-h{c['heads']}kv{c['kv_heads']}-"
        f"cmp{c['compress_block_size']}s{c['compress_block_sliding_stride']}-"
        f"sel{c['selection_block_size']}x{c['num_selected_blocks']}"
        + ("-diff" if c["use_diff_topk"] else "")
        + ("" if c["query_heads_share_selected_kv"] else "-own")
    )


@pytest.mark.parametrize("path", ["dense", "gathered"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_branches_equal_the_reference(config, path, monkeypatch):
    monkeypatch.setattr(selection, "DENSE_MAX_SEQ_LEN", 10**9 if path == "dense" else 0)
    for n in (1, 5, 17, 33):
        x = torch.randn(2, n, config["heads"] * 8)
        for branch in ("compressed", "selected"):
            with contextlib.redirect_stdout(io.StringIO()):  # it prints when 0 blocks are selected
                model, expected = reference_branch(config, branch, x)
            ours = our_branches(model, x)[branch]
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5, msg=f"{branch}, n={n}")
