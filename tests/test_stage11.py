"""Notebook 11's exercises: the specs agree with the package and an untouched stub is
reported as not implemented yet (every case and every known mistake of every stage are
checked in tests/test_exercises.py and tests/test_checks.py)."""

import torch

from nsa_tutorial import training
from nsa_tutorial.course import check
from nsa_tutorial.course import stage11_capstone as stage11
from nsa_tutorial.course.verdict import TODO


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
