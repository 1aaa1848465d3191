"""The mask pictures and the explorer, driven from Python."""

import torch

from nsa_tutorial.compress import compressed_causal_mask
from nsa_tutorial.sliding import sliding_window_mask
from nsa_tutorial.viz import MaskExplorer, attended_counts, branch_masks


def test_masks_follow_the_rules():
    explorer = MaskExplorer()
    model, masks = explorer.model(), explorer.masks
    n, stride, block = 96, 4, 8
    assert torch.equal(masks["sliding"], sliding_window_mask(n, model.sliding_window_size, True))
    visible = compressed_causal_mask(n, n // stride, stride, 1)
    assert torch.equal(masks["compressed_tokens"], visible.sum(-1))
    last_seen = visible[:, 1:].sum(-1) * stride - 1  # last key covered by a visible block
    for query in (0, 11, 12, 95):
        covered = masks["compressed"][query].nonzero().flatten()
        assert (covered.max() if len(covered) else torch.tensor(-1)) == last_seen[query]
    own = torch.arange(n) // block
    assert not (masks["selected"] & (own[None, :] >= own[:, None])).any(), "only past blocks"
    assert (masks["selected"].sum(-1) <= 2 * block).all()
    assert torch.equal(
        masks["union"],
        masks["compressed"] | masks["selected"] | masks["diagonal"] | masks["sliding"],
    )


def test_moving_a_slider_redraws_the_same_image_and_recounts():
    explorer = MaskExplorer()
    image, before = explorer.image, explorer.image.value
    explorer.controls["query"].value = 40
    assert explorer.image is image and explorer.image.value != before
    counts = explorer.current_counts
    assert counts == attended_counts(explorer.masks, 40)
    assert counts["sliding"] == 9 and counts["diagonal"] == 40 % 8 + 1
    assert counts["compressed"] == 1 + 40 // 4  # memory + the blocks that end before 40
    assert counts["total"] == sum(
        counts[b] for b in ("compressed", "selected", "diagonal", "sliding")
    )
    assert (
        "query 40" in explorer.counts.value
        and f"{counts['total'] / 41:.0%}" in explorer.counts.value
    )


def test_sizes_change_the_masks_and_keep_the_sliders_consistent():
    explorer = MaskExplorer()
    explorer.controls["seq_len"].value = 32
    assert explorer.controls["query"].value <= 31 and explorer.masks["union"].shape == (32, 32)
    explorer.controls["compress_block"].value = 4
    assert explorer.controls["stride"].value <= 4
    explorer.controls["window"].value = 2
    assert explorer.masks["sliding"].sum(-1).max() == 3
    explorer.controls["top_n"].value = 0
    assert not explorer.masks["selected"].any()
    explorer.controls["selection_block"].value = 6  # not a multiple of the stride: interpolated
    assert explorer.model().interpolated_importance_score


def test_a_single_branch_explorer_counts_only_it():
    explorer = MaskExplorer(branches=["sliding"])
    assert set(explorer.current_counts) == {"sliding", "total", "full attention"}
    assert repr(explorer.widget) == "MaskExplorer(branches=sliding)"


def test_branch_masks_use_the_given_head():
    explorer = MaskExplorer()
    model = explorer.model()
    torch.manual_seed(1)
    x = torch.randn(1, 64, 32)
    heads = [branch_masks(model, x, head)["selected"] for head in range(4)]
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[2], heads[3])  # GQA groups share
