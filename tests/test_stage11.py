"""Notebook 11's exercises: the specs agree with the package and an untouched stub is
reported as not implemented yet (every case and every known mistake of every stage are
checked in tests/test_exercises.py and tests/test_checks.py)."""

import pytest
import torch

from nsa_tutorial import training
from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.course import check
from nsa_tutorial.course import stage11_capstone as stage11
from nsa_tutorial.course.verdict import TODO
from nsa_tutorial.selection import SELECTED_THRESHOLD


def test_targets_of_a_drawn_batch_sit_at_the_markers():
    task = training.NeedleTask(seq_len=128, window=16, num_queries=4)
    sample = training.needle_sample(task, 3, torch.Generator().manual_seed(0))
    targets = stage11.needle_targets_spec(sample.tokens, sample.values, task.query_token)
    answers = (targets != -100).nonzero()[:, 1].reshape(3, 4)
    assert torch.equal(answers, sample.query_positions)
    assert torch.equal(targets[targets != -100].reshape(3, 4)[:, 0], sample.values)


def test_accuracy_of_perfect_logits_is_one_and_of_no_answers_zero():
    targets = torch.tensor([[-100, 3, -100, 1]])
    logits = torch.nn.functional.one_hot(targets.clamp(min=0), 5).float()
    assert stage11.answer_accuracy_spec(logits, targets).item() == 1.0
    none = torch.full((1, 4), -100)
    assert stage11.answer_accuracy_spec(logits, none).item() == 0.0


@pytest.mark.parametrize(
    ("stride", "interpolate"), [(4, False), (4, True), (8, False)], ids=["4", "4-interp", "8"]
)
def test_top_selected_block_is_the_layers_first_pick(stride, interpolate):
    """On a real layer's importance, at every query (a partial last block included), the
    spec and the package name the block the layer's top-k puts first, and -1 exactly
    where the layer attends none of its picks."""
    torch.manual_seed(0)
    layer = SparseAttention(
        dim=32, dim_head=16, heads=4, kv_heads=2, sliding_window_size=8,
        compress_block_size=8, compress_block_sliding_stride=stride, selection_block_size=8,
        num_selected_blocks=2, causal=True, interpolated_importance_score=interpolate,
    )  # fmt: skip
    x = torch.randn(2, 60, 32)
    importance = training.block_importance(layer, x)  # (2, 2, 60, 7)
    values, indices = training.selected_blocks(layer, x)  # (2, 2, 60, 2)
    for t in range(60):
        queries = torch.tensor([t, 59 - t])
        top = stage11.top_selected_block_spec(importance, queries, 8)  # (2, 2)
        assert torch.equal(training.top_selected_block(importance, queries, 8), top)
        first, value = indices[[0, 1], :, queries, 0], values[[0, 1], :, queries, 0]
        assert torch.equal(top == -1, value <= SELECTED_THRESHOLD)
        assert torch.equal(top[top >= 0], first[top >= 0])
    assert bool((stage11.top_selected_block_spec(importance, torch.tensor([7, 3]), 8) == -1).all())


def answer_accuracy_stub(logits, targets, ignore_index=-100):
    raise NotImplementedError("Exercise answer_accuracy: write this part")


def top_selected_block_stub(importance, queries, block_size):
    raise NotImplementedError("Exercise top_selected_block: write this part")


@pytest.mark.parametrize(
    ("name", "stub"),
    [("answer_accuracy", answer_accuracy_stub), ("top_selected_block", top_selected_block_stub)],
)
def test_stub_is_not_implemented_yet(name, stub):
    verdict = check(name, stub)
    assert verdict.status == TODO and "not implemented yet" in str(verdict)
