"""The Chinese edition: translations kept beside the English, and the notebooks made of them.

Every notebook's translation must be complete and current (no cell missing, stale,
orphaned, or changing code), as must every exercise's hints; `notebooks_zh/` must be
what the generator writes, and a Chinese notebook's code must be the English one's,
comments aside.
"""

import json
from pathlib import Path

import nbformat
import pytest
import torch

from nsa_tutorial.course import translations as tr
from nsa_tutorial.course.language import LANGUAGE_SETTING
from nsa_tutorial.course.notebooks import NOTEBOOKS, SOLUTIONS

SOLVED = sorted(SOLUTIONS.glob("*.ipynb"))  # every one has a Chinese edition


@pytest.mark.parametrize("solution", SOLVED, ids=lambda p: p.stem)
def test_translation_is_complete_and_current(solution):
    assert tr.problems(solution, "zh") == []


def test_chinese_notebooks_are_regenerated():
    assert tr.stale_localized("zh") == [], "run `make exercises`"


@pytest.mark.parametrize("solution", SOLVED, ids=lambda p: p.stem)
def test_chinese_notebook_runs_the_english_code(solution):
    english = nbformat.read(NOTEBOOKS / solution.name, as_version=4)
    chinese = nbformat.read(tr.FOLDERS["zh"] / solution.name, as_version=4)
    assert [c.cell_type for c in chinese.cells] == [c.cell_type for c in english.cells]
    for ours, theirs in zip(chinese.cells, english.cells, strict=True):
        if theirs.cell_type == "code":
            assert tr._code_tokens(ours.source) == tr._code_tokens(theirs.source)
    text = "".join(c.source for c in chinese.cells if c.cell_type == "markdown")
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) > len(text) / 10  # mostly Chinese


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A one-notebook course in tmp_path: a solution with markdown, a commented code cell
    and an uncommented one, and an empty translation folder."""
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# Title\n\nSome prose.", id="t-0"),
        nbformat.v4.new_code_cell("x = 1  # one\n# NBVAL_IGNORE_OUTPUT", id="t-1"),
        nbformat.v4.new_code_cell("y = 2", id="t-2"),
    ]
    path = solutions / "01_demo.ipynb"
    nbformat.write(notebook, path)
    monkeypatch.setattr(tr, "TRANSLATIONS", tmp_path / "translations")
    monkeypatch.setitem(tr.FOLDERS, "zh", tmp_path / "notebooks_zh")
    (tmp_path / "translations" / "zh").mkdir(parents=True)
    return path


def write_translation(path: Path, cells: dict) -> None:
    target = tr.translation_path(path, "zh")
    target.write_text(json.dumps({"cells": cells}, ensure_ascii=False), encoding="utf-8")


def test_problems_name_missing_stale_orphan_and_changed_code(course):
    notebook = nbformat.read(course, as_version=4)
    markdown, code = notebook.cells[0].source, notebook.cells[1].source
    write_translation(course, {"t-0": {"english": tr.fingerprint(markdown), "text": "# 标题"}})
    assert tr.problems(course, "zh") == ["01_demo.ipynb cell 1 (t-1): missing"]
    write_translation(course, {
        "t-0": {"english": tr.fingerprint("# Old title"), "text": "# 标题"},
        "t-1": {"english": tr.fingerprint(code), "text": "x = 3  # 一\n# NBVAL_IGNORE_OUTPUT"},
        "gone": {"english": "0", "text": "旧"},
    })  # fmt: skip
    assert tr.problems(course, "zh") == [
        "01_demo.ipynb cell 0 (t-0): stale (the English changed since it was translated)",
        "01_demo.ipynb cell 1 (t-1): the translation changes code, not only comments",
        "01_demo.ipynb cell gone: orphan (no such cell)",
    ]


def test_localized_notebook_swaps_translations_and_keeps_code(course):
    notebook = nbformat.read(course, as_version=4)
    write_translation(course, {
        "t-0": {"english": tr.fingerprint(notebook.cells[0].source), "text": "# 标题\n\n说明。"},
        "t-1": {"english": tr.fingerprint(notebook.cells[1].source),
                "text": "x = 1  # 一\n# NBVAL_IGNORE_OUTPUT"},
    })  # fmt: skip
    assert tr.problems(course, "zh") == []
    localized = tr.localized_notebook(course, "zh")
    assert [c.source for c in localized.cells] == [
        "# 标题\n\n说明。", "x = 1  # 一\n# NBVAL_IGNORE_OUTPUT", "y = 2"
    ]
    assert not tr.readable(notebook.cells[2])  # no comment, nothing to translate


def test_todo_lists_only_what_needs_work(course):
    notebook = nbformat.read(course, as_version=4)
    assert set(tr.todo(course, "zh")) == {"t-0", "t-1"}
    write_translation(course, {"t-0": {"english": tr.fingerprint(notebook.cells[0].source),
                                       "text": "# 标题"}})  # fmt: skip
    assert tr.todo(course, "zh") == {
        "t-1": {"english": tr.fingerprint(notebook.cells[1].source),
                "source": notebook.cells[1].source}
    }  # fmt: skip


def test_every_solution_is_a_notebook_the_tools_can_key():
    """Cell ids are the keys: every solution cell has one, unique in its notebook."""
    for path in sorted(SOLUTIONS.glob("*.ipynb")):
        ids = [cell.id for cell in nbformat.read(path, as_version=4).cells]
        assert len(set(ids)) == len(ids), path.name


def english_hints() -> dict:
    from nsa_tutorial.course.checks import EXERCISES

    return {name: exercise.hints for name, exercise in EXERCISES.items()}


def test_every_exercise_has_current_chinese_hints():
    assert tr.hint_problems(english_hints(), "zh") == []


def test_hint_speaks_the_course_language(monkeypatch):
    from nsa_tutorial.course.checks import EXERCISES
    from nsa_tutorial.course.hints import Hints

    chinese = tr.load_hint_translations("zh")["rms_norm"]["hints"]
    monkeypatch.setenv(LANGUAGE_SETTING, "zh")
    hints = Hints(EXERCISES)
    assert str(hints("rms_norm")).startswith(f"💡 rms_norm，提示 1/3：{chinese[0]}")
    assert "3 条提示都已看过" in str(hints("rms_norm", 3)) + str(hints("rms_norm"))
    for setting in ("en", "fr"):  # English, and English for a language with no translation
        monkeypatch.setenv(LANGUAGE_SETTING, setting)
        assert str(Hints(EXERCISES)("rms_norm")).startswith("💡 rms_norm, hint 1 of 3: x is")


def test_stale_hints_fall_back_to_english():
    hints = english_hints()["rms_norm"]
    changed = (hints[0] + " (reworded)", *hints[1:])
    assert tr.localized_hints("rms_norm", changed, "zh") == changed
    assert tr.hint_problems({"rms_norm": changed}, "zh")[0] == (
        "hints of rms_norm: stale (the English changed since translated)"
    )


def test_every_verdict_text_has_a_chinese_translation():
    assert tr.verdict_problems(tr.english_verdict_texts(), "zh") == []


def test_verdicts_speak_the_course_language(monkeypatch):
    from nsa_tutorial.course import check
    from nsa_tutorial.course.language import say

    def one_key_too_many(seq_len, window, causal):
        i, j = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
        return (j >= i - window - 1) & (j <= i)

    def stub(seq_len, window, causal):
        raise NotImplementedError

    monkeypatch.setenv(LANGUAGE_SETTING, "zh")
    wrong = str(check("sliding_window_mask", one_key_too_many))
    case = say("case {number} of {total} ({inputs})", number=1, total=4,
               inputs="seq_len=10, window=3, causal=True")  # fmt: skip
    assert wrong.startswith(f"❌ sliding_window_mask: {case}") and case.startswith("第")
    todo = str(check("sliding_window_mask", stub))
    assert todo.startswith("⏳ sliding_window_mask: ") and "not implemented" not in todo
    monkeypatch.setenv(LANGUAGE_SETTING, "en")
    assert str(check("sliding_window_mask", one_key_too_many)).startswith(
        "❌ sliding_window_mask: case 1 of 4 (seq_len=10, window=3, causal=True)"
    )
