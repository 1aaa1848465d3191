"""Hints, one at a time: `hint("rms_norm")` shows the next hint of that exercise.

Each exercise's hints go from what its shapes mean, to the rule it computes, to a
skeleton with the details left out; none of them is the solution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nsa_tutorial.course.checks import EXERCISES
from nsa_tutorial.course.language import course_language
from nsa_tutorial.course.translations import localized_hints
from nsa_tutorial.course.verdict import Exercise


@dataclass(frozen=True)
class Hint:
    """One hint as a learner reads it (its repr is the text a notebook shows)."""

    text: str

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class Hints:
    """Hands out each exercise's hints in order and remembers how far each one got."""

    def __init__(self, exercises: Mapping[str, Exercise]) -> None:
        self.exercises = exercises
        self.shown: dict[str, int] = {}

    def __call__(self, name: str, number: int | None = None) -> Hint:
        """The next hint of exercise `name`, or hint `number` (from 1) to see one again, in
        the course's language (NSA_TUTORIAL_LANG; English where no translation is current)."""
        if name not in self.exercises:
            known = ", ".join(sorted(self.exercises))
            raise ValueError(f"no exercise named {name!r}; the exercises are: {known}")
        language = course_language()
        hints = localized_hints(name, self.exercises[name].hints, language)
        if number is None:
            number = self.shown.get(name, 0) + 1
        elif not 1 <= number <= len(hints):
            raise ValueError(f"{name} has hints 1 to {len(hints)}; got number={number}")
        if number > len(hints):
            return Hint(self._no_more(name, language))
        self.shown[name] = number
        frame = FRAMES[language]
        more = frame["more"].format(name=name, next=number + 1) if number < len(hints) else ""
        shown = frame["hint"].format(name=name, number=number, total=len(hints))
        return Hint(f"{shown}{hints[number - 1]}{more}")

    def _no_more(self, name: str, language: str) -> str:
        """What a call after the last hint says."""
        exercise = self.exercises[name]
        return FRAMES[language]["done"].format(
            name=name, total=len(exercise.hints), stage=exercise.stage
        )


# The words around each hint, per language.
FRAMES = {
    "en": {
        "hint": "💡 {name}, hint {number} of {total}: ",
        "more": '\n   (hint("{name}") again for hint {next})',
        "done": '💡 {name}: no more hints, you have seen all {total}. hint("{name}", 1) shows '
                "the first again; the solved notebook solutions/{stage}_*.ipynb has the answer.",
    },
    "zh": {
        "hint": "💡 {name}，提示 {number}/{total}：",
        "more": '\n   （再运行一次 hint("{name}") 看提示 {next}）',
        "done": '💡 {name}：{total} 条提示都已看过。hint("{name}", 1) 重新显示第一条；'
                "解答在 solutions/{stage}_*.ipynb 中。",
    },
}  # fmt: skip

hint = Hints(EXERCISES)
