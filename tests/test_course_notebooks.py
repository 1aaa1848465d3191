"""The solutions -> exercises generator, the learner-function extraction, and the
exercise notebooks themselves: up to date, and friendly when run untouched."""

import ast
import inspect
import re
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from nsa_tutorial.course import EXERCISES, STAGES
from nsa_tutorial.course import stage08_triton_forward as stage08
from nsa_tutorial.course import stage10_whole_layer as stage10
from nsa_tutorial.course.notebooks import (
    NOTEBOOKS,
    ROOT,
    SOLUTIONS,
    NotebookError,
    exercise_notebook,
    learner_definitions,
    stale_notebooks,
    strip_solutions,
)

SOLVED = """\
def square(x):
    # x: any tensor
    # BEGIN SOLUTION
    y = x * x
    return y
    # END SOLUTION
"""


def test_notebooks_folder_is_generated_from_solutions():
    assert stale_notebooks() == [], "notebooks/ is stale: run `make exercises`"


def test_solution_region_becomes_a_stub_naming_the_exercise():
    assert strip_solutions(SOLVED) == (
        "def square(x):\n"
        "    # x: any tensor\n"
        '    raise NotImplementedError("Exercise square: write this part")'
    )


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "line 1: BEGIN SOLUTION outside a def"),
        ("def f():\n    # BEGIN SOLUTION\n    return 1", "BEGIN SOLUTION is never closed"),
        ("def f():\n    return 1\n    # END SOLUTION", "line 3: END SOLUTION without BEGIN"),
        ("def f():\n  # BEGIN SOLUTION\n  # BEGIN SOLUTION", "line 3: nested BEGIN SOLUTION"),
    ],
)
def test_malformed_regions_are_refused(source, problem):
    with pytest.raises(NotebookError, match=re.escape(problem)):
        strip_solutions(source, "cell 3")


def test_exercise_notebook_clears_outputs_and_keeps_the_rest():
    solved = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Title"),
            nbformat.v4.new_code_cell(
                SOLVED, execution_count=3, outputs=[nbformat.v4.new_output("stream", text="hi")]
            ),
        ]
    )
    exercise = exercise_notebook(solved)
    assert exercise.cells[0].source == "# Title"
    assert exercise.cells[1].outputs == [] and exercise.cells[1].execution_count is None
    assert "BEGIN SOLUTION" not in exercise.cells[1].source
    assert solved.cells[1].outputs, "the solution notebook itself is left untouched"


KERNEL = {"name": "python3", "display_name": "Python 3"}


def test_exercise_notebook_drops_saved_widget_state():
    solved = nbformat.v4.new_notebook(metadata={"widgets": {"state": {}}, "kernelspec": KERNEL})
    assert exercise_notebook(solved).metadata == {"kernelspec": KERNEL}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_exercise_has_a_region_and_a_check_cell(stage):
    (path,) = SOLUTIONS.glob(f"{stage}_*.ipynb")
    sources = [c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code"]
    stubbed = {m for s in sources for m in re.findall(r"Exercise (\w+):", strip_solutions(s))}
    assert stubbed == {e.name for e in STAGES[stage]}
    for exercise in STAGES[stage]:
        assert any(f'check("{exercise.name}", {exercise.name})' in s for s in sources)


def test_definitions_are_extracted_without_running_other_code(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("%matplotlib inline\nimport math\nraise SystemExit('plots')"),
            nbformat.v4.new_code_cell("def area(r):\n    return math.pi * r ** 2\nprint(area(1))"),
        ]
    )
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(notebook, path)
    definitions = learner_definitions(path)
    assert definitions["area"](1.0) == pytest.approx(3.14159, rel=1e-5)


def test_a_cell_that_does_not_parse_is_named(tmp_path):
    notebook = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("text"),
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("def f(:\n    pass"),
        ]
    )
    path = tmp_path / "01_broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(
        NotebookError, match=r"01_broken.ipynb \[code cell 2\] does not parse, line 1"
    ):
        learner_definitions(path)


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_fresh_exercise_notebook_runs_to_friendly_todo_verdicts(path):
    notebook = nbformat.read(path, 4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    stage = path.name[:2]
    for exercise in STAGES[stage]:
        assert f"⏳ {exercise.name}: not implemented yet (Exercise {exercise.name}:" in texts
    assert "Traceback" not in texts and "site-packages" not in texts


def make(*arguments):
    return subprocess.run(
        ["make", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_make_check_on_a_fresh_notebook_reports_todo_without_make_noise():
    result = make("check", "NB=1")
    assert result.returncode == 0, result.stderr
    for exercise in STAGES["01"]:
        assert f"⏳ {exercise.name}: not implemented yet" in result.stdout
    assert f"0 of {len(STAGES['01'])} exercises of notebook 01 pass." in result.stdout
    assert "site-packages" not in result.stdout and "Traceback" not in result.stdout
    assert "make" not in result.stderr and "python -m" not in result.stdout  # no echoed recipe


def test_make_check_strict_keeps_a_failing_status_for_scripts():
    assert make("check", "NB=1", "STRICT=1").returncode != 0


def test_make_progress_lists_every_exercise_in_one_table():
    result = make("progress")
    assert result.returncode == 0, result.stderr
    for name in EXERCISES:
        assert f"{name}" in result.stdout
    assert f"0 passed, 0 wrong, {len(EXERCISES)} not yet" in result.stdout
    assert "make" not in result.stderr


def test_every_exercise_belongs_to_a_stage_notebook():
    for exercise in EXERCISES.values():
        assert len(list(SOLUTIONS.glob(f"{exercise.stage}_*.ipynb"))) == 1


@pytest.mark.parametrize(
    ("stage", "launcher"),
    [
        ("08", stage08.launch_softmax_mean_kernel),
        ("08", stage08.launch_selection_kernel),
        ("10", stage10.launch_compressed_kernel),
    ],
)
def test_kernel_notebooks_show_the_launcher_their_check_uses(stage, launcher):
    (path,) = SOLUTIONS.glob(f"{stage}_*.ipynb")
    shown = [
        ast.get_source_segment(cell.source, node)
        for cell in nbformat.read(path, 4).cells
        if cell.cell_type == "code"
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.FunctionDef) and node.name == launcher.__name__
    ]
    assert shown == [inspect.getsource(launcher).strip()]
