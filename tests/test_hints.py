"""`hint(name)`: at least two hints per exercise, handed out one at a time, none of
them the solution; a failing verdict points to them."""

import re

import nbformat
import pytest

from nsa_tutorial.course import EXERCISES, check, hint
from nsa_tutorial.course.hints import Hints
from nsa_tutorial.course.notebooks import BEGIN, END, SOLUTIONS

ALL = pytest.mark.parametrize("name", sorted(EXERCISES))


def solution_lines(name):
    """The code lines of the exercise's solution region in its solved notebook."""
    (path,) = SOLUTIONS.glob(f"{EXERCISES[name].stage}_*.ipynb")
    for cell in nbformat.read(path, 4).cells:
        match = re.search(rf"def {name}\(.*?{BEGIN}\n(.*?){END}", cell.source, flags=re.DOTALL)
        if cell.cell_type == "code" and match:
            lines = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
            return [line for line in lines if line]
    raise AssertionError(f"no solution region for {name}")


@ALL
def test_every_exercise_has_at_least_two_distinct_hints(name):
    hints = EXERCISES[name].hints
    assert len(hints) >= 2 and len(set(hints)) == len(hints)


@ALL
def test_the_hints_leave_most_of_the_solution_to_the_learner(name):
    hints = EXERCISES[name].hints
    assert "..." in hints[-1], "the last hint is a skeleton with gaps"
    code = solution_lines(name)
    given = [line for line in code if any(line in h for h in hints)]
    assert len(given) <= len(code) // 2, f"the hints spell out {given}"


@ALL
def test_successive_calls_advance_then_stop_with_a_clear_message(name):
    hints = Hints(EXERCISES)  # a fresh book: nobody has asked for a hint yet
    total = len(EXERCISES[name].hints)
    for number, text in enumerate(EXERCISES[name].hints, start=1):
        shown = repr(hints(name))
        assert shown.startswith(f"💡 {name}, hint {number} of {total}: {text}")
        assert (f'hint("{name}") again for hint {number + 1}' in shown) == (number < total)
    last = repr(hints(name))
    assert f"no more hints, you have seen all {total}" in last
    assert f'hint("{name}", 1) shows the first again' in last
    assert repr(hints(name)) == last  # it stays at the end
    assert f"hint 1 of {total}" in repr(hints(name, 1))
    assert f"hint 2 of {total}" in repr(hints(name))  # and goes on from there


def test_hint_is_exported_and_remembers_each_exercise_apart():
    first = repr(hint("block_probabilities", 1))
    assert "hint 1 of" in first and "hint 2 of" in repr(hint("block_probabilities"))
    assert "hint 1 of" in repr(hint("rms_norm", 1))


def test_unknown_exercise_or_hint_number_is_refused():
    with pytest.raises(ValueError, match="no exercise named 'rmsnorm'; the exercises are: "):
        hint("rmsnorm")
    with pytest.raises(ValueError, match="rms_norm has hints 1 to 3; got number=7"):
        hint("rms_norm", 7)


def rms_without_weight(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_a_failing_verdict_points_to_the_hints_and_a_passing_one_does_not():
    pointer = 'Stuck? hint("rms_norm") gives the next hint.'
    assert str(check("rms_norm", rms_without_weight)).endswith(pointer)
    assert "hint" not in str(check("rms_norm", EXERCISES["rms_norm"].spec))
