"""Course tooling from the shell.

python -m nsa_tutorial.course exercises          regenerate notebooks/ (and notebooks_zh/)
python -m nsa_tutorial.course exercises --check  fail if notebooks/ or notebooks_zh/ is stale
python -m nsa_tutorial.course translations       stale, missing or code-changing translations
python -m nsa_tutorial.course translations --todo PATH   a solution's cells left to translate
python -m nsa_tutorial.course execute PATH...    re-run solution notebooks, save outputs
python -m nsa_tutorial.course env                check this machine for the course
python -m nsa_tutorial.course check NB           check the exercises of notebooks/NB_*.ipynb
python -m nsa_tutorial.course progress           every exercise of notebooks/ in one table

`check` and `progress` exit 0 once they have reported, whatever the verdicts, so that
`make check` and `make progress` end with the report, not with make's error line;
with --strict they exit 1 unless every exercise passes (for scripts and CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nsa_tutorial.course import notebooks
from nsa_tutorial.course.translations import FOLDERS

STRICT_HELP = "exit 1 unless every exercise passes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa_tutorial.course")
    commands = parser.add_subparsers(dest="command", required=True)
    exercises = commands.add_parser("exercises", help="regenerate notebooks/ from solutions/")
    exercises.add_argument("--check", action="store_true", help="only report stale notebooks")
    execute = commands.add_parser("execute", help="re-execute notebooks in place")
    execute.add_argument("paths", nargs="+", type=Path)
    translations = commands.add_parser("translations", help="check the translations")
    translations.add_argument("--lang", default="zh", choices=sorted(FOLDERS))
    translations.add_argument("--todo", type=Path, metavar="PATH",
                              help="print a solution notebook's cells left to translate "
                                   "(JSON); the word hints or verdicts: those left")
    commands.add_parser("env", help="check this machine for the course")
    check = commands.add_parser("check", help="check the exercises of notebooks/NB_*.ipynb")
    check.add_argument("notebook", metavar="NB", help="the notebook's number, e.g. 02")
    check.add_argument("--strict", action="store_true", help=STRICT_HELP)
    progress = commands.add_parser("progress", help="every exercise of notebooks/, one table")
    progress.add_argument("--strict", action="store_true", help=STRICT_HELP)
    args = parser.parse_args(argv)

    if args.command in ("check", "progress"):
        return report_exercises(args.command, getattr(args, "notebook", None), args.strict)

    if args.command == "translations":
        return report_translations(args.lang, args.todo)
    if args.command == "exercises":
        from nsa_tutorial.course import translations as tr

        if args.check:
            stale = [f"notebooks/{name}" for name in notebooks.stale_notebooks()]
            for lang, folder in FOLDERS.items():
                stale += [f"{folder.name}/{name}" for name in tr.stale_localized(lang)]
            for name in stale:
                print(f"stale: {name} (run `make exercises`)")
            return 1 if stale else 0
        written = notebooks.write_exercise_notebooks()
        written += [path for lang in FOLDERS for path in tr.write_localized_notebooks(lang)]
        for path in written:
            print(f"wrote {path.relative_to(notebooks.ROOT)}")
    elif args.command == "execute":
        for path in args.paths:
            print(f"executing {path}", flush=True)
            notebooks.execute_in_place(path)
    else:
        from nsa_tutorial.course.environment import environment_report

        report = environment_report()
        print(report)
        return 0 if report.ready else 1
    return 0


def report_translations(lang: str, todo: Path | None) -> int:
    """Print what keeps the translations into `lang` from being complete and current (or,
    with `todo`, one notebook's cells left to translate as JSON); the exit status."""
    import json

    from nsa_tutorial.course import translations as tr
    from nsa_tutorial.course.checks import EXERCISES
    from nsa_tutorial.course.language import translated_texts

    english_hints = {name: exercise.hints for name, exercise in EXERCISES.items()}
    verdicts = tr.english_verdict_texts()
    if todo is not None:
        if str(todo) == "hints":
            left = tr.hints_todo(english_hints, lang)
        elif str(todo) == "verdicts":
            done = translated_texts(lang)
            left = {text: "" for text in verdicts if text not in done}
        else:
            left = tr.todo(todo, lang)
        print(json.dumps(left, ensure_ascii=False, indent=1))
        return 0
    found = [issue for path in tr.translated_solutions(lang) for issue in tr.problems(path, lang)]
    found += tr.hint_problems(english_hints, lang) + tr.verdict_problems(verdicts, lang)
    print("\n".join(found) if found else f"{lang}: every translated notebook is complete, current")
    return 1 if found else 0


def report_exercises(command: str, notebook: str | None, strict: bool) -> int:
    """Print the verdicts of one notebook (`check`) or the progress table; the exit status."""
    from nsa_tutorial.course.progress import check_notebook, progress, stage_of

    if command == "progress":
        report = progress()
        print(report)
        return 1 if strict and not report.complete else 0
    try:
        stage = stage_of(notebook)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    verdicts = check_notebook(stage)
    print("\n".join(map(str, verdicts)))
    passed = sum(v.passed for v in verdicts)
    print(f"\n{passed} of {len(verdicts)} exercises of notebook {stage} pass.")
    return 1 if strict and passed < len(verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
