"""`progress()` and `python -m nsa_tutorial.course check|progress`: every exercise of a
learner's saved notebooks as passed / not yet / wrong, and an exit status for scripts."""

import shutil

import nbformat
import pytest

from nsa_tutorial.course import EXERCISES, STAGES
from nsa_tutorial.course.__main__ import main
from nsa_tutorial.course.notebooks import SOLUTIONS
from nsa_tutorial.course.progress import check_notebook, progress, stage_of
from nsa_tutorial.course.verdict import FAIL, PASS, TODO

WRONG_WINDOW = """\
import torch


def sliding_window_mask(seq_len, window, causal):
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    return (j > i - window) & (j <= i)
"""


def notebook_with(path, *sources):
    nbformat.write(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]), path
    )


@pytest.fixture
def learner(tmp_path):
    """A learner's folder: notebook 01 solved, 05 half done and wrong, 02 broken, no others."""
    shutil.copy(next(SOLUTIONS.glob("01_*.ipynb")), tmp_path)
    notebook_with(tmp_path / "05_sliding_window.ipynb", WRONG_WINDOW)
    notebook_with(tmp_path / "02_compression.ipynb", "def compression_windows(x:\n    pass")
    return tmp_path


def row(table, name):
    (line,) = [line for line in table.splitlines() if f" {name} " in f" {line} "]
    return line


def test_progress_shows_every_exercise_passed_wrong_or_not_yet(learner):
    report = progress(learner)
    table = repr(report)
    for name in EXERCISES:
        assert name in table
    for name in ("rms_norm", "rotary_frequencies", "rotate_pairs", "apply_rotary"):
        assert row(table, name).endswith("✅ passed")
    assert "❌ wrong: case 1 of 4 (seq_len=10, window=3, causal=True)" in row(
        table, "sliding_window_mask"
    )
    assert row(table, "sliding_window_attention").endswith("⏳ not yet")
    assert "❌ wrong: 02_compression.ipynb [code cell 1] does not parse" in row(
        table, "compression_windows"
    )
    assert row(table, STAGES["00"][0].name).startswith("00 (missing)")
    assert row(table, STAGES["00"][-1].name).endswith("⏳ not yet")
    wrong = 1 + len(STAGES["02"])
    assert report.count(PASS) == 4 and report.count(FAIL) == wrong
    assert report.count(TODO) == len(EXERCISES) - 4 - wrong
    assert f"4 passed, {wrong} wrong, {len(EXERCISES) - 4 - wrong} not yet" in table
    assert "`make check NB=..`" in table and not report.complete


def test_check_notebook_names_a_missing_function(learner):
    verdicts = check_notebook("05", learner)
    assert [v.status for v in verdicts] == [FAIL, TODO]
    assert "05_sliding_window.ipynb defines no function `sliding_window_attention`" in str(
        verdicts[1]
    )


def test_a_definition_that_raises_is_a_verdict_not_a_crash(tmp_path):
    notebook_with(tmp_path / "00_welcome.ipynb", "import no_such_module_here")
    verdicts = check_notebook("00", tmp_path)
    assert len(verdicts) == len(STAGES["00"])
    for verdict in verdicts:
        assert verdict.status == FAIL
        assert "raised ModuleNotFoundError: No module named 'no_such_module_here'" in (
            verdict.message
        )


@pytest.mark.parametrize(("text", "stage"), [("1", "01"), ("05", "05"), ("03_importance", "03")])
def test_notebook_numbers_are_read_as_stages(text, stage):
    assert stage_of(text) == stage


def test_an_unknown_notebook_is_refused_with_the_list():
    with pytest.raises(ValueError, match="no notebook '42'; the notebooks are 00, 01"):
        stage_of("42")


def test_check_command_reports_and_exits_0_unless_strict(capsys):
    assert main(["check", "5"]) == 0  # the untouched exercise notebook
    out = capsys.readouterr().out
    for exercise in STAGES["05"]:
        assert f"⏳ {exercise.name}: not implemented yet" in out
    assert f"0 of {len(STAGES['05'])} exercises of notebook 05 pass." in out
    assert main(["check", "5", "--strict"]) == 1
    assert main(["check", "42"]) == 2
    assert "no notebook '42'" in capsys.readouterr().err


def test_progress_command_exits_1_when_strict_and_unfinished(capsys):
    assert main(["progress", "--strict"]) == 1
    assert f"0 passed, 0 wrong, {len(EXERCISES)} not yet" in capsys.readouterr().out
