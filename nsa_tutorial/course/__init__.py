"""Course tooling: exercise checks, notebook generation and the environment report."""

from nsa_tutorial.course.checks import EXERCISES, STAGES, check

__all__ = ["EXERCISES", "STAGES", "check"]
