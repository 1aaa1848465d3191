"""Stage 03 functions against loop specs, F.interpolate, and a loop of the seed's method."""

import pytest
import torch
import torch.nn.functional as F

from nsa_tutorial.course.stage03_importance import (
    block_probabilities_spec,
    group_mean_spec,
    selection_block_scores_spec,
)
from nsa_tutorial.importance import (
    block_probabilities,
    group_mean,
    importance_scores,
    interpolate_linear,
    selection_block_scores,
)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_group_mean(group):
    scores = torch.randn(2, 4 * group, 5, 3)
    torch.testing.assert_close(group_mean(scores, group), group_mean_spec(scores, group))


@pytest.mark.parametrize("w", [0, 1, 2, 5, 8])
@pytest.mark.parametrize(("stride", "block"), [(4, 8), (2, 8), (4, 16), (4, 4)])
def test_selection_block_scores(w, stride, block):
    scores = torch.randn(1, 2, 3, w)
    torch.testing.assert_close(
        selection_block_scores(scores, stride, block),
        selection_block_scores_spec(scores, stride, block),
    )


@pytest.mark.parametrize(("w", "length"), [(1, 4), (3, 12), (5, 7), (6, 3), (4, 64)])
def test_interpolation_is_torchs_linear_resampling(w, length):
    scores = torch.randn(2, 3, w)
    expected = F.interpolate(scores.reshape(-1, 1, w, 1), (length, 1), mode="bilinear")
    torch.testing.assert_close(interpolate_linear(scores, length), expected.reshape(2, 3, length))


def interpolated_block_scores_loop(scores, stride, block):
    """Token t at source coordinate (t + 0.5) / stride - 0.5 between two blocks' scores,
    then the mean of each complete selection block (the seed's method, one token at a time)."""
    w = scores.shape[-1]
    tokens = []
    for t in range(w * stride):
        source = min(max((t + 0.5) / stride - 0.5, 0.0), w - 1)
        left = int(source)
        right = min(left + 1, w - 1)
        tokens.append(
            scores[..., left] * (1 - (source - left)) + scores[..., right] * (source - left)
        )
    tokens = torch.stack(tokens, dim=-1)
    count = w * stride // block
    return torch.stack(
        [tokens[..., b * block : (b + 1) * block].mean(-1) for b in range(count)], -1
    )


@pytest.mark.parametrize(("stride", "block"), [(4, 2), (4, 6), (8, 4), (2, 8)])
def test_interpolated_scores(stride, block):
    scores = torch.randn(2, 5, 7)
    torch.testing.assert_close(
        selection_block_scores(scores, stride, block, interpolate=True),
        interpolated_block_scores_loop(scores, stride, block),
    )


def test_block_probabilities():
    scores = torch.randn(2, 2, 17, 4)
    torch.testing.assert_close(block_probabilities(scores, 4), block_probabilities_spec(scores, 4))


def test_importance_scores_drop_memory_average_groups_and_map_blocks():
    logits = torch.randn(1, 4, 9, 2 + 4)  # 2 memory tokens, 4 compressed blocks of stride 2
    scores = importance_scores(logits, num_memory=2, stride=2, selection_block=4, group_size=2)
    expected = block_probabilities_spec(
        selection_block_scores_spec(group_mean_spec(logits[..., 2:], 2), 2, 4), 4
    )
    torch.testing.assert_close(scores, expected)
    assert scores.shape == (1, 2, 9, 2)


def test_hidden_blocks_get_no_probability():
    logits = torch.full((1, 1, 3, 1 + 2), -3.4e37)
    assert importance_scores(logits, 1, 4, 4, group_size=1).max() == 0
