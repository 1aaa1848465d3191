"""Checks for notebook 11: the capstone's training batch and its accuracy.

Two exercises:

- `needle_targets`: the targets of a needle-task batch: the sequence's value at every
  query marker, the ignore index everywhere else;
- `answer_accuracy`: the fraction of answer positions (targets != ignore index) whose
  top logit is the target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake

# ---- exercise A: the targets of a batch -------------------------------------------------


def needle_targets_spec(
    tokens: Tensor, values: Tensor, query_token: int, ignore_index: int = -100
) -> Tensor:
    """(b, n) long: values[i] where tokens[i, t] is the query marker, else ignore_index."""
    targets = torch.full_like(tokens, ignore_index)
    for row in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            if tokens[row, t] == query_token:
                targets[row, t] = values[row]
    return targets


def _targets_cases() -> list[Case]:
    g = torch.Generator().manual_seed(110)

    def case(b, n, query_token, num_queries, ignore_index=-100):
        tokens = torch.randint(0, query_token, (b, n), generator=g)
        positions = torch.rand(b, n, generator=g).argsort(dim=-1)[:, :num_queries]
        tokens[torch.arange(b)[:, None], positions] = query_token
        values = torch.randint(query_token + 1, query_token + 9, (b,), generator=g)
        return Case((tokens, values, query_token), {"ignore_index": ignore_index})

    return [case(1, 12, 5, 2), case(3, 20, 8, 3), case(2, 16, 4, 1, ignore_index=-1)]


def _shifted_targets(tokens, values, query_token, ignore_index=-100):
    """The answer one position after the marker, as in next-token prediction."""
    targets = needle_targets_spec(tokens, values, query_token, ignore_index)
    return torch.cat((torch.full_like(targets[:, :1], ignore_index), targets[:, :-1]), dim=1)


NEEDLE_TARGETS = Exercise(
    name="needle_targets",
    stage="11",
    hints=(
        "tokens is (b, n) token ids, values (b,) the one answer per sequence; the result is "
        "(b, n) long, the target the loss sees at each position.",
        (
            "the rule: where tokens == query_token the target is that sequence's value, "
            "everywhere else ignore_index, so that cross_entropy skips those positions."
        ),
        (
            "a skeleton:\n"
            "    is_query = tokens == ...\n"
            "    return torch.where(is_query, values[..., None], torch.full_like(tokens, ...))"
        ),
    ),
    spec=needle_targets_spec,
    make_cases=_targets_cases,
    mistakes=(
        Mistake(
            "the answer is due at the query marker itself (the model reads the marker and "
            "answers there), not one position later as in next-token prediction.",
            _shifted_targets,
        ),
        Mistake(
            "positions that are not answers get ignore_index (-100 by default, "
            "cross_entropy's ignore_index), not 0: token 0 is a real symbol.",
            lambda tokens, values, query, ignore_index=-100: needle_targets_spec(
                tokens, values, query, 0
            ),
        ),
        Mistake(
            "use the argument ignore_index, not a fixed -100.",
            lambda tokens, values, query, ignore_index=-100: needle_targets_spec(
                tokens, values, query
            ),
        ),
        Mistake(
            "every target elsewhere is ignore_index, not the input token: only the answers "
            "are scored.",
            lambda tokens, values, query, ignore_index=-100: torch.where(
                tokens == query, values[:, None], tokens
            ),
        ),
        Mistake(
            "the target at a marker is the sequence's value (values[row]), not the marker.",
            lambda tokens, values, query, ignore_index=-100: needle_targets_spec(
                tokens, torch.full_like(values, query), query, ignore_index
            ),
        ),
    ),
)


# ---- exercise B: accuracy at the answers only --------------------------------------------


def answer_accuracy_spec(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """0-dim float32: among positions with targets != ignore_index, the fraction whose
    largest logit (logits (b, n, v)) sits at the target."""
    correct = total = 0
    for row in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[row, t] != ignore_index:
                total += 1
                correct += int(logits[row, t].argmax() == targets[row, t])
    return torch.tensor(correct / max(total, 1), dtype=torch.float32)


def _accuracy_cases() -> list[Case]:
    g = torch.Generator().manual_seed(111)

    def case(n, v, answers, hits, ignore_index=-100):
        """answers[row] answer positions in each row, the first hits[row] of them right."""
        b = len(answers)
        logits = torch.randn(b, n, v, generator=g)
        best = logits.argmax(dim=-1)
        wrong = (best + 1) % v
        targets = torch.full((b, n), ignore_index)
        order = torch.rand(b, n, generator=g).argsort(dim=-1)
        for row in range(b):
            for slot, t in enumerate(order[row, : answers[row]].tolist()):
                targets[row, t] = best[row, t] if slot < hits[row] else wrong[row, t]
        return Case((logits, targets), {"ignore_index": ignore_index})

    return [
        case(10, 6, [4], [3]),  # 3 of 4 answers right
        case(16, 9, [5, 5], [2, 4]),  # most other positions would be "wrong" too
        case(12, 5, [1, 4, 3], [1, 1, 0], ignore_index=-1),  # rows with more answers weigh more
        case(8, 7, [3, 2], [0, 0]),  # none right: 0, not NaN
    ]


def _mean_over_rows(logits, targets, ignore_index=-100):
    answers = targets != ignore_index
    correct = (logits.argmax(dim=-1) == targets) & answers
    per_row = correct.sum(dim=1).float() / answers.sum(dim=1).clamp(min=1)
    return per_row.mean()


def _counts_only(logits, targets, ignore_index=-100):
    answers = targets != ignore_index
    return ((logits.argmax(dim=-1) == targets) & answers).sum().float()


ANSWER_ACCURACY = Exercise(
    name="answer_accuracy",
    stage="11",
    hints=(
        "logits is (b, n, v): a score per symbol at every position; targets (b, n) hold the "
        "answer or ignore_index. The result is one number, a 0-dim float32 tensor.",
        (
            "the rule: a position counts only where targets != ignore_index; it is correct "
            "where the largest logit is the target. Divide the correct ones by the answers."
        ),
        (
            "a skeleton:\n"
            "    answers = targets != ...\n"
            "    correct = (logits.argmax(dim=...) == targets) & answers\n"
            "    return correct.sum().float() / ..."
        ),
    ),
    spec=answer_accuracy_spec,
    make_cases=_accuracy_cases,
    mistakes=(
        Mistake(
            "only answer positions count: divide by the number of targets != ignore_index, "
            "not by every position of the batch.",
            lambda logits, targets, ignore_index=-100: (
                ((logits.argmax(-1) == targets) & (targets != ignore_index)).float().mean()
            ),
        ),
        Mistake(
            "that is the number of correct answers; divide it by the number of answers.",
            _counts_only,
        ),
        Mistake(
            "average over all answers of the batch, not per sequence and then over sequences.",
            _mean_over_rows,
        ),
    ),
)

EXERCISES = [NEEDLE_TARGETS, ANSWER_ACCURACY]
