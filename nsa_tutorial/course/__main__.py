"""Course tooling from the shell.

python -m nsa_tutorial.course exercises          regenerate notebooks/ from solutions/
python -m nsa_tutorial.course exercises --check  fail if notebooks/ is stale
python -m nsa_tutorial.course execute PATH...    re-run solution notebooks, save outputs
python -m nsa_tutorial.course env                check this machine for the course
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nsa_tutorial.course import notebooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nsa_tutorial.course")
    commands = parser.add_subparsers(dest="command", required=True)
    exercises = commands.add_parser("exercises", help="regenerate notebooks/ from solutions/")
    exercises.add_argument("--check", action="store_true", help="only report stale notebooks")
    execute = commands.add_parser("execute", help="re-execute notebooks in place")
    execute.add_argument("paths", nargs="+", type=Path)
    commands.add_parser("env", help="check this machine for the course")
    args = parser.parse_args(argv)

    if args.command == "exercises":
        if args.check:
            stale = notebooks.stale_notebooks()
            for name in stale:
                print(f"stale: notebooks/{name} (run `make exercises`)")
            return 1 if stale else 0
        for path in notebooks.write_exercise_notebooks():
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


if __name__ == "__main__":
    sys.exit(main())
