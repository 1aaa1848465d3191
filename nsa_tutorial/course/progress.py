"""A learner's progress: every exercise of their saved notebooks, checked.

`check_notebook("02")` checks the functions defined in `notebooks/02_*.ipynb` (as
`make check NB=02` does; `notebooks_zh/` when the course speaks Chinese); `progress()`
does it for every stage and lays the verdicts out as one table (`make progress` and a
cell of notebook 00).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path

from nsa_tutorial.course.checks import STAGES, check
from nsa_tutorial.course.language import learner_folder, say
from nsa_tutorial.course.notebooks import NotebookError, learner_definitions, stage_notebook
from nsa_tutorial.course.verdict import FAIL, PASS, TODO, Verdict

_DETAIL_WIDTH = 64  # characters of a failing verdict's first line shown in the table


def stage_of(text: str) -> str:
    """The stage of a notebook number: 1, 01 or 01_rmsnorm_rotary -> "01".

    Raises ValueError naming the stages when there is no such notebook."""
    digits = text.split("_")[0]
    stage = f"{int(digits):02d}" if digits.isdigit() else digits
    if stage not in STAGES:
        raise ValueError(f"no notebook {text!r}; the notebooks are {', '.join(STAGES)}")
    return stage


def check_notebook(stage: str, folder: Path | None = None) -> list[Verdict]:
    """Check every exercise of `stage` against the functions its saved notebook in
    `folder` (the learner's folder of the course's language by default) defines.

    A notebook that is missing, does not parse or fails while defining its functions
    yields one verdict per exercise that says so, never an exception.
    """
    exercises = STAGES[stage]
    folder = folder or learner_folder()
    try:
        path = stage_notebook(stage, folder)
    except NotebookError as error:
        message = say("no notebook to check ({error}).", error=error)
        return [Verdict(e.name, TODO, message) for e in exercises]
    try:
        namespace = learner_definitions(path)
    except NotebookError as error:
        return [Verdict(e.name, FAIL, f"{error}.") for e in exercises]
    except Exception as error:  # an import or a decorator in the learner's cells failed
        message = say("running the definitions of {name} raised {kind}: {error}",
                      name=path.name, kind=type(error).__name__, error=error)  # fmt: skip
        return [Verdict(e.name, FAIL, message) for e in exercises]
    return [
        check(e.name, namespace[e.name])
        if e.name in namespace
        else Verdict(e.name, TODO, say("{name} defines no function `{exercise}` yet.",
                                       name=path.name, exercise=e.name))
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
        width_nb = max(map(_width, [*names.values(), say("notebook")]))
        width_ex = max(map(_width, [v.name for vs in self.verdicts.values() for v in vs]
                                   + [say("exercise")]))  # fmt: skip
        header = f"{_pad(say('notebook'), width_nb)}  {_pad(say('exercise'), width_ex)}"
        lines = [f"{header}  {say('status')}"]
        for stage, verdicts in self.verdicts.items():
            for number, verdict in enumerate(verdicts):
                notebook = _pad(names[stage] if number == 0 else "", width_nb)
                row = f"{notebook}  {_pad(verdict.name, width_ex)}  {_status(verdict)}"
                lines.append(row.rstrip())
        total = sum(map(len, self.verdicts.values()))
        lines.append("\n" + say(
            "{passed} passed, {wrong} wrong, {todo} not yet, of {total} exercises (as last "
            "saved in {folder}/).", passed=self.count(PASS), wrong=self.count(FAIL),
            todo=self.count(TODO), total=total, folder=self.folder.name,
        ))  # fmt: skip
        if self.count(FAIL):
            lines.append(say("`make check NB=..` (or the notebook's check cell) explains each ❌."))
        return "\n".join(lines)

    __str__ = __repr__


def _width(text: str) -> int:
    """Columns `text` takes in a terminal: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def progress(folder: Path | None = None) -> Progress:
    """Check every exercise of every stage in the saved notebooks of `folder` (the
    learner's folder of the course's language by default)."""
    folder = folder or learner_folder()
    return Progress({stage: check_notebook(stage, folder) for stage in STAGES}, folder)


def _status(verdict: Verdict) -> str:
    """A verdict as the table's status column: the label, and for ❌ where it went wrong."""
    if verdict.status == PASS:
        return say("✅ passed")
    if verdict.status == TODO:
        return say("⏳ not yet")
    first = verdict.message.splitlines()[0]
    if len(first) > _DETAIL_WIDTH:
        first = first[: _DETAIL_WIDTH - 1] + "…"
    return f"{say('❌ wrong')}: {first}"


def _notebook_name(stage: str, folder: Path) -> str:
    """The stem of the stage's notebook in `folder`, or "NN (missing)"."""
    try:
        return stage_notebook(stage, folder).stem
    except NotebookError:
        return say("{stage} (missing)", stage=stage)
