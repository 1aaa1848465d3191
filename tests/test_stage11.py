"""Notebook 11's exercises: the specs agree with the package, each known mistake is named,
and an untouched stub is reported as not implemented yet."""

import pytest
import torch

from nsa_tutorial import training
from nsa_tutorial.course import check
from nsa_tutorial.course import stage11_capstone as stage11
from nsa_tutorial.course.verdict import FAIL, PASS, TODO


@pytest.mark.parametrize(
    ("exercise", "package"),
    [
        (stage11.NEEDLE_TARGETS, training.needle_targets),
        (stage11.ANSWER_ACCURACY, training.answer_accuracy),
    ],
    ids=lambda x: getattr(x, "name", ""),
)
def test_package_passes_every_case(exercise, package):
    verdict = check(exercise.name, package)
    assert verdict.status == PASS, str(verdict)


@pytest.mark.parametrize(
    "exercise", [stage11.NEEDLE_TARGETS, stage11.ANSWER_ACCURACY], ids=lambda e: e.name
)
def test_each_mistake_is_named(exercise):
    for mistake in exercise.mistakes:
        verdict = check(exercise.name, mistake.compute)
        assert verdict.status == FAIL, str(verdict)
        assert mistake.hint in str(verdict).split("Likely cause:")[1]


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


def test_stub_is_not_implemented_yet():
    def answer_accuracy(logits, targets, ignore_index=-100):
        raise NotImplementedError("Exercise answer_accuracy: write this part")

    verdict = check("answer_accuracy", answer_accuracy)
    assert verdict.status == TODO and "not implemented yet" in str(verdict)
