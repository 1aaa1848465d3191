"""Stage 05: the sliding window against local-attention's exact window (the reference's)."""

import pytest
import torch
from local_attention import LocalAttention

from nsa_tutorial.sliding import sliding_window_attention, sliding_window_mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 2, 4, 5])
@pytest.mark.parametrize("n", [1, 3, 4, 9, 17])
def test_matches_local_attention(causal, window, n):
    torch.manual_seed(n * 7 + window)
    reference = LocalAttention(
        dim=8,
        window_size=window,
        causal=causal,
        exact_windowsize=True,
        autopad=True,
        use_rotary_pos_emb=False,
    )
    q, k, v = torch.randn(3, 2, 2, n, 8).unbind(0)
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window, causal), reference(q, k, v)
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("hq", "hk"), [(2, 2), (4, 2), (4, 1)])
def test_equals_dense_attention_under_the_window_mask(causal, hq, hk):
    n, window = 16, 4  # a multiple of the window: no zero padding to see
    q, k, v = (torch.randn(2, h, n, 8) for h in (hq, hk, hk))
    k_full, v_full = (t.repeat_interleave(hq // hk, dim=1) for t in (k, v))
    scores = q @ k_full.transpose(-1, -2) * 8**-0.5
    mask = sliding_window_mask(n, window, causal)
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v_full
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, causal), expected)


def test_mask_rule():
    mask = sliding_window_mask(6, 2, causal=True)
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert sliding_window_mask(6, 2, causal=False)[2].tolist() == [True] * 5 + [False]
