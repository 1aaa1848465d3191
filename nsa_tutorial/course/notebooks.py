"""Notebook tooling: solution notebooks -> exercise notebooks, re-executing
solutions, and pulling a learner's definitions out of their notebook.

`solutions/NN_name.ipynb` is the one source. In its code cells, the lines between
`# BEGIN SOLUTION` and `# END SOLUTION` are what the learner writes; the exercise
notebook `notebooks/NN_name.ipynb` replaces them with a stub that raises
NotImplementedError naming the exercise (the function the region sits in).
"""

from __future__ import annotations

import ast
import linecache
import re
import types
from pathlib import Path

import nbformat
from nbformat import NotebookNode

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
_DEF = re.compile(r"^\s*def (\w+)\(")


class NotebookError(ValueError):
    """A notebook that the tooling cannot use, with the cell and the reason."""


def stub_line(indent: str, exercise: str) -> str:
    return f'{indent}raise NotImplementedError("Exercise {exercise}: write this part")'


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every solution region of a code cell's source with a stub."""
    out: list[str] = []
    exercise, inside = None, False
    for number, line in enumerate(source.splitlines(), start=1):
        if match := _DEF.match(line):
            exercise = match.group(1)
        stripped = line.strip()
        if stripped == BEGIN:
            if inside or exercise is None:
                problem = "nested BEGIN SOLUTION" if inside else "BEGIN SOLUTION outside a def"
                raise NotebookError(f"{where}, line {number}: {problem}")
            inside = True
            out.append(stub_line(line[: len(line) - len(line.lstrip())], exercise))
        elif stripped == END:
            if not inside:
                raise NotebookError(f"{where}, line {number}: END SOLUTION without BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise NotebookError(f"{where}: BEGIN SOLUTION is never closed")
    return "\n".join(out)


def exercise_notebook(solution: NotebookNode, name: str = "notebook") -> NotebookNode:
    """The learner's version of a solution notebook: solutions stubbed, outputs cleared."""
    notebook = nbformat.from_dict(solution)
    notebook.metadata.pop("widgets", None)  # saved widget state belongs to the outputs
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        cell.source = strip_solutions(cell.source, f"{name}, cell {index}")
        cell.outputs = []
        cell.execution_count = None
    return notebook


def exercise_text(solution_path: Path) -> str:
    """The exact text `notebooks/` should hold for a solution notebook."""
    solution = nbformat.read(solution_path, as_version=4)
    return nbformat.writes(exercise_notebook(solution, solution_path.name)) + "\n"


def write_exercise_notebooks(
    solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS
) -> list[Path]:
    """Regenerate every exercise notebook from its solution; return the paths written."""
    notebooks.mkdir(exist_ok=True)
    written = []
    for solution_path in sorted(solutions.glob("*.ipynb")):
        target = notebooks / solution_path.name
        target.write_text(exercise_text(solution_path), encoding="utf-8")
        written.append(target)
    return written


def stale_notebooks(solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS) -> list[str]:
    """Names of exercise notebooks that are missing, outdated or have no solution."""
    expected = {p.name: exercise_text(p) for p in sorted(solutions.glob("*.ipynb"))}
    present = {p.name for p in notebooks.glob("*.ipynb")}
    stale = [
        name
        for name, text in expected.items()
        if name not in present or (notebooks / name).read_text(encoding="utf-8") != text
    ]
    return stale + sorted(present - expected.keys())


def execute_in_place(path: Path, timeout: int = 600) -> None:
    """Run a notebook top to bottom in a fresh kernel and save its outputs."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    nbformat.write(notebook, path)


def stage_notebook(stage: str, folder: Path = NOTEBOOKS) -> Path:
    """The notebook of stage "01" (or "1") in `folder`."""
    matches = sorted(folder.glob(f"{int(stage):02d}_*.ipynb"))
    if len(matches) != 1:
        raise NotebookError(
            f"expected one notebook {int(stage):02d}_*.ipynb in {folder}, found {len(matches)}"
        )
    return matches[0]


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)


def learner_definitions(path: Path) -> dict[str, object]:
    """Execute the imports, functions and classes of a notebook's code cells, in order.

    Other statements (plots, prints, check calls) are skipped, so a half-finished
    notebook still yields the functions it defines. Cells that do not parse raise
    NotebookError naming the cell and line.
    """
    notebook = nbformat.read(path, as_version=4)
    module = types.ModuleType(f"learner_{path.stem}")
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for number, cell in enumerate(code_cells, start=1):
        filename = f"{path.name} [code cell {number}]"
        source = _without_magics(cell.source)
        try:
            tree = ast.parse(source, filename=filename)
        except SyntaxError as error:
            raise NotebookError(
                f"{filename} does not parse, line {error.lineno}: {error.msg}"
            ) from None
        tree.body = [node for node in tree.body if isinstance(node, _KEPT)]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(tree, filename, "exec"), module.__dict__)
    return module.__dict__


def _without_magics(source: str) -> str:
    """Blank out IPython magics and shell escapes (%..., !...) so the cell parses as Python."""
    return "\n".join(
        "" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
    )
