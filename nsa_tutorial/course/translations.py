"""One source, two languages: each notebook's Chinese text, kept beside the English.

`solutions/NN_name.ipynb` stays the one source of code and outputs. For each cell a
learner reads (every markdown cell, and every code cell with comments that are not
tool directives), `translations/<lang>/NN_name.json` holds the translated source and
the fingerprint of the English source it was translated from:

    {"cells": {"<cell id>": {"english": "<fingerprint>", "text": "<translated source>"}}}

A translated code cell may change its comments only. `problems` names every cell whose
English changed since its translation (stale), that has none (missing), that no longer
exists (orphan), or whose translation changed code; `localized_notebook` swaps the
translations in, and `write_localized_notebooks` writes the learner's notebooks of a
language (`notebooks_zh/`), as `make exercises` writes `notebooks/`.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import string
import tokenize
from collections.abc import Mapping, Sequence
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from nsa_tutorial.course.language import LEARNER_FOLDERS, translated_texts
from nsa_tutorial.course.notebooks import ROOT, SOLUTIONS, exercise_notebook

TRANSLATIONS = ROOT / "translations"
FOLDERS = {lang: folder for lang, folder in LEARNER_FOLDERS.items() if lang != "en"}
DIRECTIVES = ("# NBVAL_", "# BEGIN SOLUTION", "# END SOLUTION", "# noqa", "# fmt:")


def fingerprint(source: str) -> str:
    """A short hash of a cell's English source: its translation is stale once it changes."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def _comments(source: str) -> list[str]:
    """The comments of a code cell that a learner reads (not the tools' directives)."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    return [t.string for t in tokens
            if t.type == tokenize.COMMENT and not t.string.startswith(DIRECTIVES)]  # fmt: skip


def _code_tokens(source: str) -> list[tuple[int, str]]:
    """A code cell's tokens without comments and line breaks: what must not change."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(t.type, t.string) for t in tokens if t.type not in skip]


def readable(cell: NotebookNode) -> bool:
    """Whether a cell has text to translate: markdown, or code with comments."""
    if cell.cell_type == "markdown":
        return bool(cell.source.strip())
    return cell.cell_type == "code" and bool(_comments(cell.source))


def translation_path(solution: Path, lang: str) -> Path:
    return TRANSLATIONS / lang / f"{solution.stem}.json"


def load_translations(solution: Path, lang: str) -> dict[str, dict[str, str]]:
    """Cell id -> {"english": fingerprint, "text": translation}; empty without a file."""
    path = translation_path(solution, lang)
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def problems(solution: Path, lang: str) -> list[str]:
    """What keeps `solution`'s translation into `lang` from being complete and current."""
    notebook = nbformat.read(solution, as_version=4)
    translated = load_translations(solution, lang)
    found = []
    for index, cell in enumerate(notebook.cells):
        where = f"{solution.name} cell {index} ({cell.id})"
        entry = translated.get(cell.id)
        if not readable(cell):
            continue
        if entry is None:
            found.append(f"{where}: missing")
        elif entry["english"] != fingerprint(cell.source):
            found.append(f"{where}: stale (the English changed since it was translated)")
        elif cell.cell_type == "code" and _code_tokens(entry["text"]) != _code_tokens(cell.source):
            found.append(f"{where}: the translation changes code, not only comments")
    ids = {cell.id for cell in notebook.cells if readable(cell)}
    found += [
        f"{solution.name} cell {key}: orphan (no such cell)"
        for key in translated.keys() - ids
    ]
    return found


def localized_notebook(solution: Path, lang: str) -> NotebookNode:
    """The solution notebook with every translated cell's source swapped in."""
    notebook = nbformat.read(solution, as_version=4)
    translated = load_translations(solution, lang)
    for cell in notebook.cells:
        if cell.id in translated:
            cell.source = translated[cell.id]["text"]
    return notebook


def translated_solutions(lang: str, solutions: Path = SOLUTIONS) -> list[Path]:
    """The solution notebooks that have a translation file for `lang`."""
    return [p for p in sorted(solutions.glob("*.ipynb")) if translation_path(p, lang).exists()]


def localized_text(solution: Path, lang: str) -> str:
    """The exact text the learner's notebook of `lang` should hold."""
    exercise = exercise_notebook(localized_notebook(solution, lang), solution.name)
    exercise.metadata["language"] = lang
    return nbformat.writes(exercise) + "\n"


def write_localized_notebooks(lang: str) -> list[Path]:
    """Regenerate the learner's notebooks of `lang` from solutions and translations."""
    folder = FOLDERS[lang]
    folder.mkdir(exist_ok=True)
    written = []
    for solution in translated_solutions(lang):
        target = folder / solution.name
        target.write_text(localized_text(solution, lang), encoding="utf-8")
        written.append(target)
    return written


def stale_localized(lang: str) -> list[str]:
    """Names of the learner's notebooks of `lang` that are missing, outdated or orphaned."""
    folder = FOLDERS[lang]
    expected = {p.name: localized_text(p, lang) for p in translated_solutions(lang)}
    present = {p.name for p in folder.glob("*.ipynb")}
    stale = [
        name for name, text in expected.items()
        if name not in present or (folder / name).read_text(encoding="utf-8") != text
    ]  # fmt: skip
    return stale + sorted(present - expected.keys())


def todo(solution: Path, lang: str) -> dict[str, dict[str, str]]:
    """The cells of `solution` whose translation is missing or stale, for a translator:
    cell id -> {"english": fingerprint, "source": the English source}."""
    notebook = nbformat.read(solution, as_version=4)
    translated = load_translations(solution, lang)
    return {
        cell.id: {"english": fingerprint(cell.source), "source": cell.source}
        for cell in notebook.cells
        if readable(cell) and translated.get(cell.id, {}).get("english") != fingerprint(cell.source)
    }


# ---- hints: translations/<lang>/hints.json, in the language the course speaks -----------

def hints_path(lang: str) -> Path:
    return TRANSLATIONS / lang / "hints.json"


def load_hint_translations(lang: str) -> dict[str, dict]:
    """Exercise name -> {"english": fingerprint of its English hints, "hints": [...]}."""
    path = hints_path(lang)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def hints_fingerprint(hints: Sequence[str]) -> str:
    return fingerprint("\n\n".join(hints))


def hint_problems(exercises: Mapping[str, Sequence[str]], lang: str) -> list[str]:
    """Exercises (name -> English hints) whose hints in `lang` are missing, stale, of
    another number, or that no longer exist."""
    translated = load_hint_translations(lang)
    found = []
    for name, hints in exercises.items():
        entry = translated.get(name)
        if entry is None:
            found.append(f"hints of {name}: missing")
        elif entry["english"] != hints_fingerprint(hints):
            found.append(f"hints of {name}: stale (the English changed since translated)")
        elif len(entry["hints"]) != len(hints):
            found.append(f"hints of {name}: {len(entry['hints'])} translated, {len(hints)} English")
    orphans = sorted(translated.keys() - exercises)
    return found + [f"hints of {name}: orphan (no such exercise)" for name in orphans]


def localized_hints(name: str, hints: Sequence[str], lang: str) -> Sequence[str]:
    """The hints of exercise `name` in `lang` where their translation is current, else English."""
    entry = load_hint_translations(lang).get(name) if lang != "en" else None
    if entry is None or entry["english"] != hints_fingerprint(hints):
        return hints
    return entry["hints"]


def hints_todo(exercises: Mapping[str, Sequence[str]], lang: str) -> dict[str, dict]:
    """The exercises whose hints need translating: name -> {"english", "hints" (English)}."""
    translated = load_hint_translations(lang)
    return {
        name: {"english": hints_fingerprint(hints), "hints": list(hints)}
        for name, hints in exercises.items()
        if translated.get(name, {}).get("english") != hints_fingerprint(hints)
    }


# ---- verdicts: translations/<lang>/verdicts.json, English text -> translation --------------


def verdict_templates() -> list[str]:
    """Every template the course's checks pass to `say` (read from their source)."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "say"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.append(node.args[0].value)
    return list(dict.fromkeys(found))


def english_verdict_texts() -> list[str]:
    """The English texts of the checks' verdicts: the templates and the known mistakes."""
    from nsa_tutorial.course.checks import EXERCISES

    mistakes = [m.hint for exercise in EXERCISES.values() for m in exercise.mistakes]
    return list(dict.fromkeys(verdict_templates() + mistakes))


def _fields(text: str) -> set[str]:
    """The placeholders of a template ({} for a text that is not one)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError:
        return set()


def verdict_problems(texts: Sequence[str], lang: str) -> list[str]:
    """Texts of the verdicts (templates and known mistakes) with no translation in
    `lang`, translations whose placeholders differ, and translations of gone texts."""
    translated = translated_texts(lang)
    found = [f"verdict text missing: {text!r}" for text in texts if text not in translated]
    found += [f"verdict text with other placeholders: {text!r}" for text in texts
              if text in translated and _fields(translated[text]) != _fields(text)]  # fmt: skip
    gone = sorted(translated.keys() - set(texts))
    return found + [f"verdict text orphan (no longer used): {text!r}" for text in gone]
