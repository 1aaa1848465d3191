"""The flex-attention masks give SparseAttention the same numbers as its default path."""

import pytest
import torch

from nsa_tutorial import SparseAttention
from nsa_tutorial.fine_attention import fine_selection_flex_mask
from nsa_tutorial.sliding import sliding_window_flex_mask

# Uncompiled flex attention (the CPU path) warns that it materialises the scores.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "shared"), [(2, 2, True), (4, 2, True), (4, 2, False)]
)
@pytest.mark.parametrize("n", [7, 24])
def test_flex_masks_equal_the_default_path(causal, heads, kv_heads, shared, n):
    torch.manual_seed(n)
    model = SparseAttention(
        dim=16,
        dim_head=8,
        heads=heads,
        kv_heads=kv_heads,
        sliding_window_size=5,
        compress_block_size=4,
        compress_block_sliding_stride=2,
        selection_block_size=4,
        num_selected_blocks=2,
        causal=causal,
        query_heads_share_selected_kv=shared,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(2, n, 16)
    with torch.no_grad():  # flex attention has no backward on the CPU (torch 2.13)
        flex = model(
            x,
            sliding_window_flex_mask=sliding_window_flex_mask(n, 5, causal),
            fine_selection_flex_mask=fine_selection_flex_mask(n, 4, causal),
        )
        torch.testing.assert_close(flex, model(x), atol=1e-5, rtol=1e-5)


def test_flex_masks_for_another_length_are_refused():
    model = SparseAttention(
        dim=16,
        dim_head=8,
        heads=2,
        sliding_window_size=4,
        compress_block_size=4,
        selection_block_size=4,
        num_selected_blocks=1,
    )
    x = torch.randn(1, 9, 16)
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="built for 8 queries, but inp has seq_len=9"),
    ):
        model(x, sliding_window_flex_mask=sliding_window_flex_mask(8, 4, False))
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="built for 8 tokens, but the sequence has 9"),
    ):
        model(x, fine_selection_flex_mask=fine_selection_flex_mask(8, 4, False))


def test_flex_selection_refuses_diff_topk():
    model = SparseAttention(
        dim=16,
        dim_head=8,
        heads=2,
        sliding_window_size=4,
        causal=True,
        compress_block_size=4,
        selection_block_size=4,
        num_selected_blocks=1,
        use_diff_topk=True,
    )
    with torch.no_grad(), pytest.raises(ValueError, match="cannot be combined with use_diff_topk"):
        model(
            torch.randn(1, 12, 16), fine_selection_flex_mask=fine_selection_flex_mask(12, 4, True)
        )
