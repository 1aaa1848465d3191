"""Stage 04 functions: top-n, gathering, and the fine-attention paths against the loop spec."""

import functools

import pytest
import torch

from nsa_tutorial.course.stage04_selection import fine_attention_spec, gather_blocks_spec
from nsa_tutorial.fine_attention import (
    fine_attention,
    fine_attention_dense,
    fine_attention_gathered,
    gather_blocks,
)
from nsa_tutorial.selection import straight_through_gates, top_blocks

PATHS = [fine_attention_dense, fine_attention_gathered, fine_attention]


def test_top_blocks_clips_n():
    importance = torch.rand(1, 1, 4, 3)
    values, indices = top_blocks(importance, 5)
    assert values.shape == indices.shape == (1, 1, 4, 3)
    values, indices = top_blocks(torch.rand(1, 1, 4, 0), 5)
    assert values.shape == indices.shape == (1, 1, 4, 0)


@pytest.mark.parametrize(("hk", "h"), [(1, 1), (2, 2), (1, 4), (2, 4)])
def test_gather_blocks(hk, h):
    x = torch.randn(2, hk, 11, 3)
    indices = torch.randint(0, 3, (2, h, 11, 2))
    torch.testing.assert_close(gather_blocks(x, indices, 4), gather_blocks_spec(x, indices, 4))


def random_selection(b, h, n, block, s, causal, generator):
    """s distinct blocks per query (fewer if there are fewer blocks), ~70% selected."""
    blocks = -(-n // block)
    s = min(s, blocks)
    indices = torch.stack(
        [torch.randperm(blocks, generator=generator)[:s] for _ in range(b * h * n)]
    ).reshape(b, h, n, s)
    selected = torch.rand(b, h, n, s, generator=generator) > 0.3
    if not causal:
        selected[..., 0] = True
    return indices, selected


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("hq", "hk", "shared"), [(2, 2, True), (4, 2, True), (4, 1, True), (4, 2, False)]
)
@pytest.mark.parametrize(("n", "block"), [(3, 4), (8, 4), (13, 4), (10, 2)])
def test_fine_attention_matches_the_loop(path, causal, hq, hk, shared, n, block):
    g = torch.Generator().manual_seed(n * 31 + hq)
    h = hk if shared else hq
    q, k, v = (torch.randn(1, heads, n, 8, generator=g) for heads in (hq, hk, hk))
    indices, selected = random_selection(1, h, n, block, 2, causal, g)
    expected = fine_attention_spec(q, k, v, indices, selected, block_size=block, causal=causal)
    out = path(q, k, v, indices, selected, block_size=block, causal=causal)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_paths_agree_on_gradients_with_diff_topk_gates(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, 23, 8, generator=g, requires_grad=True) for heads in (4, 2, 2))
    importance = torch.rand(2, 2, 23, 5, generator=g, requires_grad=True)
    results = []
    for path in PATHS:
        values, indices = top_blocks(importance, 3)
        gates = straight_through_gates(values)
        out = path(q, k, v, indices, values > 0.3, block_size=4, causal=causal, gates=gates)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v, importance))
        results.append((out, *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results[0][-1].abs().sum() > 0, "the gates pass gradients to the importance scores"


def test_straight_through_gates_are_one_forward_and_identity_backward():
    values = torch.rand(5, requires_grad=True)
    gates = straight_through_gates(values)
    torch.testing.assert_close(gates, torch.ones(5))
    (grad,) = torch.autograd.grad(gates.sum(), values)
    torch.testing.assert_close(grad, torch.ones(5))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_dense_path_in_query_chunks_equals_the_gathered_path(causal, chunk):
    g = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(2, heads, 19, 8, generator=g, requires_grad=True) for heads in (4, 2, 2))
    importance = torch.rand(2, 2, 19, 4, generator=g, requires_grad=True)
    results = []
    for path in (functools.partial(fine_attention_dense, chunk=chunk), fine_attention_gathered):
        values, indices = top_blocks(importance, 2)
        gates = straight_through_gates(values)
        out = path(q, k, v, indices, values > 0.3, block_size=4, causal=causal, gates=gates)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v, importance))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_rows_from_first_query_equal_those_rows_of_the_whole_sequence(path):
    """A decoding step: queries 13.. over all keys give the last rows of the full call."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, heads, 19, 8, generator=g) for heads in (4, 2, 2))
    indices, selected = random_selection(1, 2, 19, 4, 2, True, g)
    gates = torch.rand(1, 2, 19, 2, generator=g)
    whole = fine_attention_gathered(
        q, k, v, indices, selected, block_size=4, causal=True, gates=gates
    )
    rows = path(
        q[..., 13:, :], k, v, indices[..., 13:, :], selected[..., 13:, :],
        block_size=4, causal=True, gates=gates[..., 13:, :], first_query=13,
    )  # fmt: skip
    torch.testing.assert_close(rows, whole[..., 13:, :])
