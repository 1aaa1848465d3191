"""The course's exercises by stage, and `check`, which the notebooks' check cells call.

One set of cases serves three callers: the check cells in the notebooks, `make
check NB=..` (functions extracted from a learner's notebook) and the test suite
(the package's own implementations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nsa_tutorial.course import (
    stage00_welcome,
    stage01_rmsnorm_rotary,
    stage02_compression,
    stage03_importance,
    stage04_selection,
    stage05_sliding_window,
    stage06_gating_assembly,
    stage07_kv_cache,
    stage08_triton_forward,
    stage09_triton_backward,
    stage10_whole_layer,
    stage11_capstone,
)
from nsa_tutorial.course.verdict import Exercise, Verdict, run_exercise

STAGES: dict[str, list[Exercise]] = {
    "00": stage00_welcome.EXERCISES,
    "01": stage01_rmsnorm_rotary.EXERCISES,
    "02": stage02_compression.EXERCISES,
    "03": stage03_importance.EXERCISES,
    "04": stage04_selection.EXERCISES,
    "05": stage05_sliding_window.EXERCISES,
    "06": stage06_gating_assembly.EXERCISES,
    "07": stage07_kv_cache.EXERCISES,
    "08": stage08_triton_forward.EXERCISES,
    "09": stage09_triton_backward.EXERCISES,
    "10": stage10_whole_layer.EXERCISES,
    "11": stage11_capstone.EXERCISES,
}
EXERCISES: dict[str, Exercise] = {e.name: e for stage in STAGES.values() for e in stage}


def check(name: str, fn: Callable[..., Any]) -> Verdict:
    """Check the learner's `fn` for exercise `name`; the returned verdict says what differs."""
    if name not in EXERCISES:
        known = ", ".join(sorted(EXERCISES))
        raise ValueError(f"no exercise named {name!r}; the exercises are: {known}")
    return run_exercise(EXERCISES[name], fn)
