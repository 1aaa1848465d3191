"""Course tooling: exercise checks, hints, progress, notebook generation and the
environment report."""

from nsa_tutorial.course.checks import EXERCISES, STAGES, check
from nsa_tutorial.course.hints import hint
from nsa_tutorial.course.progress import progress

__all__ = ["EXERCISES", "STAGES", "check", "hint", "progress"]
