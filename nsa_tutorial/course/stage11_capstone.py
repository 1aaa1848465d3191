"""Checks for notebook 11: the capstone's training batch, its accuracy, and a look
inside the trained layer.

Three exercises:

- `needle_targets`: the targets of a needle-task batch: the sequence's value at every
  query marker, the ignore index everywhere else;
- `answer_accuracy`: the fraction of answer positions (targets != ignore index) whose
  top logit is the target;
- `top_selected_block`: the block a trained head ranks first at a query, among the
  blocks its selection branch may pick (-1 where it picks none).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from nsa_tutorial.course.verdict import Case, Exercise, Mistake
from nsa_tutorial.selection import SELECTED_THRESHOLD

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


# ---- exercise C: the top selected block of a trained head -------------------------------


def top_selected_block_spec(importance: Tensor, queries: Tensor, block_size: int) -> Tensor:
    """(b, h) long: for sequence r and head, at its query t = queries[r], the block j with
    the largest importance[r, head, t, j] among the blocks before t's own block
    (j < t // block_size) whose importance is above SELECTED_THRESHOLD; the first on a
    tie; -1 where there is none. Those are the blocks the selection branch's top-k may
    pick (notebook 04): the own block is always attended, later ones are the future."""
    b, h, _, w = importance.shape
    best = torch.full((b, h), -1, dtype=torch.long)
    for row in range(b):
        t = int(queries[row])
        for head in range(h):
            top = SELECTED_THRESHOLD
            for block in range(min(t // block_size, w)):
                if importance[row, head, t, block] > top:
                    best[row, head], top = block, importance[row, head, t, block]
    return best


def _importance_cases() -> list[Case]:
    g = torch.Generator().manual_seed(112)

    def case(n, block_size, heads, queries, empty=()):
        """Random importance; at each query, later blocks score highest and its own block
        next (as raw scores before the causal rule would); the rows in `empty` have no
        candidate above zero."""
        b, w = len(queries), n // block_size
        importance = torch.rand(b, heads, n, w, generator=g)
        for row, t in enumerate(queries):
            own = t // block_size
            importance[row, :, t, own:] += 1.0
            importance[row, :, t, own + 1 :] += 1.0
            if row in empty:
                importance[row, :, t, :own] = 0.0
        return Case((importance, torch.tensor(queries), block_size))

    return [
        case(32, 8, 2, [26, 15, 31]),  # t = 15, 31: the last token of their own block
        case(48, 8, 3, [47, 30, 41, 17]),  # heads that disagree
        case(30, 8, 2, [27, 5, 20], empty=(2,)),  # partial last block; nothing to pick
        case(64, 16, 4, [63, 40], empty=(0,)),  # 4 heads, larger blocks
    ]


def _query_rows(importance: Tensor, queries: Tensor) -> Tensor:
    """(b, h, w): each sequence's importance at its own query."""
    return importance[torch.arange(importance.shape[0]), :, queries]


def _best_block(scores: Tensor, candidate: Tensor, none: int = -1) -> Tensor:
    """The first largest candidate score's block (last axis), `none` where no candidate
    scores above the threshold."""
    best, index = scores.masked_fill(~candidate, 0.0).max(dim=-1)
    return torch.where(best > SELECTED_THRESHOLD, index, none)


def _before(queries: Tensor, block_size: int, w: int, shift: int = 0) -> Tensor:
    """(b, 1, w) bool: the blocks before each query's own block (+ shift blocks)."""
    own = queries // block_size + shift
    return rearrange(torch.arange(w) < own[:, None], "b w -> b 1 w")


def _every_row_at_every_query(importance, queries, block_size):
    """importance[:, :, queries] reads each sequence at every sequence's query."""
    scores = importance[:, :, queries]  # (b, h, b, w)
    candidate = torch.arange(scores.shape[-1]) < (queries // block_size)[:, None]
    return _best_block(scores, candidate)


def _best_head(importance, queries, block_size):
    """The argmax over the wrong axis: the best head for each block."""
    scores = _query_rows(importance, queries)
    candidate = _before(queries, block_size, scores.shape[-1])
    return scores.masked_fill(~candidate, 0.0).argmax(dim=1)  # (b, w): over the heads


def _no_causal_rule(importance, queries, block_size):
    """Every block a candidate, the own block and the future included."""
    scores = _query_rows(importance, queries)
    return _best_block(scores, torch.ones_like(scores, dtype=torch.bool))


def _own_block_too(importance, queries, block_size):
    """j <= t // block_size: the future hidden, the own block not."""
    scores = _query_rows(importance, queries)
    return _best_block(scores, _before(queries, block_size, scores.shape[-1], shift=1))


def _block_zero_for_none(importance, queries, block_size):
    """The masked argmax alone: block 0 where nothing may be picked."""
    scores = _query_rows(importance, queries)
    candidate = _before(queries, block_size, scores.shape[-1])
    return scores.masked_fill(~candidate, 0.0).argmax(dim=-1)


def _heads_averaged(importance, queries, block_size):
    """One answer for all heads, from their mean importance."""
    scores = _query_rows(importance, queries).mean(dim=1, keepdim=True)  # (b, 1, w)
    best = _best_block(scores, _before(queries, block_size, scores.shape[-1]))
    return best.expand(-1, importance.shape[1])


def _first_query_for_all(importance, queries, block_size):
    """Every sequence read at the first sequence's query."""
    return top_selected_block_spec(importance, queries[:1].expand_as(queries), block_size)


TOP_SELECTED_BLOCK = Exercise(
    name="top_selected_block",
    stage="11",
    hints=(
        "importance is (b, h, n, w), as block_importance returns it: for each sequence, "
        "selection head and query position, the importance of each of the w selection "
        "blocks. queries (b,) holds one query position per sequence. The result is (b, h) "
        "long: one block number per sequence and head.",
        (
            "the rule, as the selection branch sees it: the query at t = queries[r] may pick "
            "only blocks before its own, block t // block_size (its own block is always "
            "attended, later ones are the future), and only one whose importance is above "
            "SELECTED_THRESHOLD (1e-10), or fine attention skips it. The largest of those, "
            "the first on a tie; -1 where there is none."
        ),
        (
            "a skeleton:\n"
            "    scores = importance[torch.arange(...), :, queries]  # (b, h, w): r at queries[r]\n"
            "    candidate = torch.arange(w) < ...  # (b, 1, w)\n"
            "    best, block = scores.masked_fill(..., 0.0).max(dim=...)  # the first on a tie\n"
            "    return torch.where(..., block, -1)"
        ),
    ),
    spec=top_selected_block_spec,
    make_cases=_importance_cases,
    mistakes=(
        Mistake(
            "importance[:, :, queries] reads every sequence at every sequence's query "
            "((b, h, b, w)); pair row r with queries[r]: importance[torch.arange(b), :, queries].",
            _every_row_at_every_query,
        ),
        Mistake(
            "that is the best head of each block (argmax over the heads, axis 1); rank the "
            "blocks (the last axis) of each head instead: the result is (b, h).",
            _best_head,
        ),
        Mistake(
            "only blocks before the query's own block are candidates: its own block and "
            "later ones (the future) are never among the selection's top-k.",
            _no_causal_rule,
        ),
        Mistake(
            "the query's own block t // block_size is not a candidate: fine attention always "
            "reads it (the block-causal diagonal), so top-k never ranks it. Keep j < t // "
            "block_size, not <=.",
            _own_block_too,
        ),
        Mistake(
            "a query with no candidate block above the threshold (the first block's queries, "
            "or all zeros) selects nothing: return -1 there, not block 0.",
            _block_zero_for_none,
        ),
        Mistake(
            "each head ranks its own blocks: do not average over the heads (axis 1) first; "
            "the heads select apart, and their picks differ.",
            _heads_averaged,
        ),
        Mistake(
            "each sequence has its own query position: row r reads importance[r, :, "
            "queries[r]], not everyone at queries[0].",
            _first_query_for_all,
        ),
    ),
)

EXERCISES = [NEEDLE_TARGETS, ANSWER_ACCURACY, TOP_SELECTED_BLOCK]
