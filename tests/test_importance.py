"""Stage 03 functions against loop specs, F.interpolate, and a loop of the seed's method."""

import pytest
import torch
import torch.nn.functional as F
from grids import IMPORTANCE_CASES

from nsa_tutorial.compress import compressed_attention, prepend_memory
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
from nsa_tutorial.kernels.importance import top_blocks_from_keys
from nsa_tutorial.selection import top_blocks


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


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "shared"), [(4, 2, True), (4, 2, False), (4, 1, True)]
)
@pytest.mark.parametrize(("stride", "selection_block", "interpolate"), IMPORTANCE_CASES)
@pytest.mark.parametrize("n", [1, 7, 33, 64])
def test_top_blocks_from_keys_equal_those_of_the_logits(
    causal, heads, kv_heads, shared, stride, selection_block, interpolate, n
):
    """The kernel path's linear importance picks the same blocks with the same values as
    notebook 03's chain over the (n, w) logits (float64, two memory tokens, chunks of 5)."""
    g = torch.Generator().manual_seed(n * 7 + stride)
    d, num_memory = 8, 2
    q = torch.randn(2, heads, n, d, generator=g, dtype=torch.float64)
    ck, cv = torch.randn(2, 2, kv_heads, n // stride, d, generator=g, dtype=torch.float64)
    memory = torch.randn(kv_heads, num_memory, d, generator=g, dtype=torch.float64)
    _, logits = compressed_attention(
        q, prepend_memory(ck, memory), prepend_memory(cv, memory), num_memory, stride, causal
    )
    group = heads // kv_heads if shared else None
    importance = importance_scores(
        logits, num_memory, stride, selection_block, group, interpolate, causal
    )
    expected_values, expected_indices = top_blocks(importance, 3)
    values, indices = top_blocks_from_keys(
        q, ck, num_selected=3, stride=stride, selection_block=selection_block,
        group_size=group, interpolate=interpolate, causal=causal, scale=d**-0.5, chunk=5,
    )  # fmt: skip
    torch.testing.assert_close(values, expected_values.float(), atol=1e-6, rtol=1e-5)
    selected = expected_values > 1e-10
    assert torch.equal(values > 1e-10, selected)
    torch.testing.assert_close(indices[selected], expected_indices[selected])


def test_top_blocks_from_keys_pass_gradients_like_the_logits():
    """With diff-topk the values are gates: their gradients reach q and the keys as
    through the logits."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ck = torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 2, 40, 2, generator=g, dtype=torch.float64)
    memory = torch.zeros(2, 1, 8, dtype=torch.float64)
    _, logits = compressed_attention(
        q, prepend_memory(ck, memory), prepend_memory(ck, memory), 1, 4, True
    )
    expected, _ = top_blocks(importance_scores(logits, 1, 4, 8, 2, False, True), 2)
    values, _ = top_blocks_from_keys(
        q, ck, num_selected=2, stride=4, selection_block=8, group_size=2, interpolate=False,
        causal=True, scale=8**-0.5,
    )  # fmt: skip
    want = torch.autograd.grad((expected * weights).sum(), (q, ck))
    got = torch.autograd.grad((values.double() * weights).sum(), (q, ck))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
