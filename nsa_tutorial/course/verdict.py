"""How an exercise is checked: run the learner's function on seeded cases, compare
with a readable reference (the *spec*), and explain any difference.

An `Exercise` bundles the spec, the cases and a list of known `Mistake`s. When the
learner's answer differs from the spec, each mistake's output is computed too; if
the answer matches one of them, the verdict names the likely cause.
"""

from __future__ import annotations

import copy
import inspect
import linecache
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PASS, FAIL, TODO = "pass", "fail", "todo"
_ICONS = {PASS: "✅", FAIL: "❌", TODO: "⏳"}
# Frames from these folders are library code, not the learner's: skip them in messages.
_LIBRARY_DIRS = tuple(
    str(Path(folder).resolve())
    for folder in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])
) + (str(Path(__file__).resolve().parent),)


@dataclass(frozen=True)
class Case:
    """One set of inputs for an exercise, with a label a learner can read."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def describe(self, fn: Callable[..., Any]) -> str:
        """The inputs by the parameter names of `fn`, e.g. "x (2, 8) float32, eps=0.01"."""
        bound = inspect.signature(fn).bind(*self.args, **self.kwargs).arguments
        return ", ".join(
            f"{name} {_describe_value(value)}"
            if isinstance(value, Tensor)
            else f"{name}={_describe_value(value)}"
            for name, value in bound.items()
        )


@dataclass(frozen=True)
class Mistake:
    """A typical wrong answer: `compute` has the spec's signature and returns what
    that mistake would produce; `hint` says what to fix."""

    hint: str
    compute: Callable[..., Any]


@dataclass(frozen=True)
class Exercise:
    """An exercise of stage `stage`: the learner writes a function called `name`."""

    name: str
    stage: str
    spec: Callable[..., Any]
    make_cases: Callable[[], Sequence[Case]]
    mistakes: tuple[Mistake, ...] = ()
    diagnose: Callable[[Any, Any, Case], str | None] | None = None
    # Turns what the learner hands to `check` into a function with the spec's signature
    # (stage 08: a Triton kernel becomes a function that launches it).
    prepare: Callable[[Any], Any] | None = None
    atol: float = 1e-5
    rtol: float = 1e-5


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one exercise; its repr is the message a learner reads."""

    name: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __repr__(self) -> str:
        return f"{_ICONS[self.status]} {self.name}: {self.message}"

    __str__ = __repr__


def run_exercise(exercise: Exercise, fn: Callable[..., Any]) -> Verdict:
    """Check `fn` against `exercise` case by case; stop at the first problem."""
    if exercise.prepare is not None:
        fn = exercise.prepare(fn)
    if not callable(fn):
        return Verdict(exercise.name, FAIL, f"expected a function, got {type(fn).__name__}.")
    cases = exercise.make_cases()
    for number, case in enumerate(cases, start=1):
        where = f"case {number} of {len(cases)} ({case.describe(exercise.spec)})"
        args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
        expected = exercise.spec(*case.args, **case.kwargs)
        try:
            got = fn(*args, **kwargs)
        except NotImplementedError as error:
            return Verdict(exercise.name, TODO, _not_implemented_message(error))
        except Exception as error:  # the learner's bug, reported without a torch traceback
            message = _exception_message(error, where)
            cause = _mistake_that_raises(exercise, type(error), case)
            if cause:
                message += f"\n   Likely cause: {cause}"
            return Verdict(exercise.name, FAIL, message)
        if not _same_inputs(args, case.args) or not _same_inputs(kwargs, case.kwargs):
            return Verdict(
                exercise.name,
                FAIL,
                f"{where}: your function changed its inputs in place; "
                "compute a new tensor instead (avoid `x *= ...`, `x.add_(...)`).",
            )
        problem = compare(got, expected, exercise.atol, exercise.rtol)
        if problem:
            cause = _likely_cause(exercise, got, expected, case)
            message = f"{where}: {problem}"
            if cause:
                message += f"\n   Likely cause: {cause}"
            return Verdict(exercise.name, FAIL, message)
    return Verdict(exercise.name, PASS, f"all {len(cases)} cases match the reference.")


def compare(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5) -> str | None:
    """Describe how `got` differs from `expected` (type, shape, dtype, values); None if equal."""
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return f"returned {_describe_value(got)}, expected a tuple of {len(expected)}."
        for index, (part, wanted) in enumerate(zip(got, expected, strict=True)):
            problem = compare(part, wanted, atol, rtol)
            if problem:
                return f"output[{index}]: {problem}"
        return None
    if not isinstance(expected, Tensor):
        return None if got == expected else f"got {got!r}, expected {expected!r}."
    if not isinstance(got, Tensor):
        return f"returned {type(got).__name__}, expected a tensor of shape {_shape(expected)}."
    if got.shape != expected.shape:
        return f"output has shape {_shape(got)}, expected {_shape(expected)}."
    if got.dtype != expected.dtype:
        return f"output has dtype {got.dtype}, expected {expected.dtype}."
    if expected.dtype == torch.bool or not expected.is_floating_point():
        differs = got != expected
    else:
        differs = ~torch.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)
    if not differs.any():
        return None
    return _describe_differences(got, expected, differs)


def _describe_differences(got: Tensor, expected: Tensor, differs: Tensor) -> str:
    count, total = int(differs.sum()), differs.numel()
    positions = differs.nonzero()[:3].tolist()
    shown = "; ".join(
        f"at {pos} got {_number(got[tuple(pos)])}, expected {_number(expected[tuple(pos)])}"
        for pos in positions
    )
    lines = [f"{count} of {total} values differ: {shown}."]
    if got.is_floating_point() and torch.isnan(got).any() and not torch.isnan(expected).any():
        lines.append("Your output contains NaN (a division by zero, or a softmax over -inf only?).")
    elif got.is_floating_point():
        error = (got - expected).abs().nan_to_num(nan=float("inf"))
        lines.append(f"Largest difference: {_number(error.max())}.")
    return "\n   ".join(lines)


def _mistake_that_raises(exercise: Exercise, kind: type, case: Case) -> str | None:
    """The hint of a known mistake that fails on this case with the same exception type."""
    for mistake in exercise.mistakes:
        try:
            mistake.compute(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
        except kind:
            return mistake.hint
        except Exception:
            continue
    return None


def _likely_cause(exercise: Exercise, got: Any, expected: Any, case: Case) -> str | None:
    for mistake in exercise.mistakes:
        try:
            wrong = mistake.compute(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
        except Exception:
            continue  # this mistake crashes on this case; the learner's answer did not
        if compare(wrong, expected, exercise.atol, exercise.rtol) is None:
            continue  # this mistake makes no difference on this case
        if compare(got, wrong, exercise.atol, exercise.rtol) is None:
            return mistake.hint
    if exercise.diagnose is not None:
        return exercise.diagnose(got, expected, case)
    return None


def _not_implemented_message(error: NotImplementedError) -> str:
    detail = f" ({error})" if str(error) else ""
    return f"not implemented yet{detail}. Replace the stub with your code, then check again."


def _exception_message(error: Exception, where: str) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    message = f"{where}: your function raised {type(error).__name__}: {first_line}"
    line = _learner_line(error)
    if line:
        message += f"\n   In your code: {line}"
    return message


def _learner_line(error: Exception) -> str | None:
    """The last line of the traceback that is not inside torch or this checker."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not str(Path(frame.filename).resolve()).startswith(_LIBRARY_DIRS)
    ]
    if not frames:
        return None
    frame = frames[-1]
    source = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f"line {frame.lineno} of {frame.name}: `{source}`"


def _same_inputs(now: Any, before: Any) -> bool:
    if isinstance(before, Tensor):
        return isinstance(now, Tensor) and torch.equal(now, before)
    if isinstance(before, (tuple, list)):
        return all(_same_inputs(a, b) for a, b in zip(now, before, strict=True))
    if isinstance(before, dict):
        return all(_same_inputs(now[k], v) for k, v in before.items())
    return True


def _describe_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe_value(v) for v in value) + ")"
    if isinstance(value, Tensor):
        return f"{_shape(value)} {str(value.dtype).removeprefix('torch.')}"
    return repr(value)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _number(t: Tensor) -> str:
    value = t.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)
