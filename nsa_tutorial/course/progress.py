"""A learner's progress: every exercise of their saved notebooks, checked.

`check_notebook("02")` checks the functions defined in `notebooks/02_*.ipynb` (as
`make check NB=02` does); `progress()` does it for every stage and lays the
verdicts out as one table (`make progress` and a cell of notebook 00).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nsa_tutorial.course.checks import STAGES, check
from nsa_tutorial.course.notebooks import (
    NOTEBOOKS,
    NotebookError,
    learner_definitions,
    stage_notebook,
)
from nsa_tutorial.course.verdict import FAIL, PASS, TODO, Verdict

_LABELS = {PASS: "✅ passed", TODO: "⏳ not yet", FAIL: "❌ wrong"}
_DETAIL_WIDTH = 64  # characters of a failing verdict's first line shown in the table


def stage_of(text: str) -> str:
    """The stage of a notebook number: 1, 01 or 01_rmsnorm_rotary -> "01".

    Raises ValueError naming the stages when there is no such notebook."""
    digits = text.split("_")[0]
    stage = f"{int(digits):02d}" if digits.isdigit() else digits
    if stage not in STAGES:
        raise ValueError(f"no notebook {text!r}; the notebooks are {', '.join(STAGES)}")
    return stage


def check_notebook(stage: str, folder: Path = NOTEBOOKS) -> list[Verdict]:
    """Check every exercise of `stage` against the functions its saved notebook defines.

    A notebook that is missing, does not parse or fails while defining its functions
    yields one verdict per exercise that says so, never an exception.
    """
    exercises = STAGES[stage]
    try:
        path = stage_notebook(stage, folder)
    except NotebookError as error:
        return [Verdict(e.name, TODO, f"no notebook to check ({error}).") for e in exercises]
    try:
        namespace = learner_definitions(path)
    except NotebookError as error:
        return [Verdict(e.name, FAIL, f"{error}.") for e in exercises]
    except Exception as error:  # an import or a decorator in the learner's cells failed
        message = f"running the definitions of {path.name} raised {type(error).__name__}: {error}"
        return [Verdict(e.name, FAIL, message) for e in exercises]
    return [
        check(e.name, namespace[e.name])
        if e.name in namespace
        else Verdict(e.name, TODO, f"{path.name} defines no function `{e.name}` yet.")
        for e in exercises
    ]


@dataclass(frozen=True)
class Progress:
    """Verdicts by stage; its repr is a table with one row per exercise."""

    verdicts: dict[str, list[Verdict]]
    folder: Path

    def count(self, status: str) -> int:
        """How many exercises have verdict `status` (PASS, TODO or FAIL)."""
        return sum(v.status == status for stage in self.verdicts.values() for v in stage)

    @property
    def complete(self) -> bool:
        """Whether every exercise passes."""
        return all(v.passed for stage in self.verdicts.values() for v in stage)

    def __repr__(self) -> str:
        names = {stage: _notebook_name(stage, self.folder) for stage in self.verdicts}
        width_nb = max(map(len, [*names.values(), "notebook"]))
        width_ex = max(len(v.name) for stage in self.verdicts.values() for v in stage)
        lines = [f"{'notebook':<{width_nb}}  {'exercise':<{width_ex}}  status"]
        for stage, verdicts in self.verdicts.items():
            for number, verdict in enumerate(verdicts):
                notebook = names[stage] if number == 0 else ""
                row = f"{notebook:<{width_nb}}  {verdict.name:<{width_ex}}  {_status(verdict)}"
                lines.append(row.rstrip())
        total = sum(map(len, self.verdicts.values()))
        lines.append(
            f"\n{self.count(PASS)} passed, {self.count(FAIL)} wrong, {self.count(TODO)} not yet, "
            f"of {total} exercises (as last saved in {self.folder.name}/)."
        )
        if self.count(FAIL):
            lines.append("`make check NB=..` (or the notebook's check cell) explains each ❌.")
        return "\n".join(lines)

    __str__ = __repr__


def progress(folder: Path = NOTEBOOKS) -> Progress:
    """Check every exercise of every stage in the saved notebooks of `folder`."""
    return Progress({stage: check_notebook(stage, folder) for stage in STAGES}, folder)


def _status(verdict: Verdict) -> str:
    """A verdict as the table's status column: the label, and for ❌ where it went wrong."""
    if verdict.status != FAIL:
        return _LABELS[verdict.status]
    first = verdict.message.splitlines()[0]
    if len(first) > _DETAIL_WIDTH:
        first = first[: _DETAIL_WIDTH - 1] + "…"
    return f"{_LABELS[FAIL]}: {first}"


def _notebook_name(stage: str, folder: Path) -> str:
    """The stem of the stage's notebook in `folder`, or "NN (missing)"."""
    try:
        return stage_notebook(stage, folder).stem
    except NotebookError:
        return f"{stage} (missing)"
