"""How an exercise is checked: run the learner's function on seeded cases, compare
with a readable reference (the *spec*), and explain any difference.

An `Exercise` bundles the spec, the cases and a list of known `Mistake`s. When the
learner's answer differs from the spec, each mistake's output is computed too; if
the answer matches one of them, the verdict names the likely cause.
"""

from __future__ import annotations

import base64
import copy
import html
import inspect
import io
import linecache
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nsa_tutorial.course.language import say, translate

PASS, FAIL, TODO = "pass", "fail", "todo"
_ICONS = {PASS: "✅", FAIL: "❌", TODO: "⏳"}
# Frames from these folders are library code, not the learner's: skip them in messages.
_LIBRARY_DIRS = tuple(
    str(Path(folder).resolve())
    for folder in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])
) + (str(Path(__file__).resolve().parent),)


@dataclass(frozen=True)
class Case:
    """One set of inputs for an exercise, with a label a learner can read; `note` says
    what the inputs hold that their shapes do not (a module's configuration, say)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    note: str = ""

    def describe(self, fn: Callable[..., Any]) -> str:
        """The inputs by the parameter names of `fn`, e.g. "x (2, 8) float32, eps=0.01"."""
        bound = inspect.signature(fn).bind(*self.args, **self.kwargs).arguments
        inputs = ", ".join(
            f"{name} {_describe_value(value)}"
            if isinstance(value, Tensor)
            else f"{name}={_describe_value(value)}"
            for name, value in bound.items()
        )
        return f"{inputs}; {self.note}" if self.note else inputs


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
    # Shown one at a time by `hint(name)`: what the shapes mean, the rule, a skeleton.
    hints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one exercise; its repr is the message a learner reads. A
    mask or index answer that differs also carries (expected, yours), which a notebook
    shows side by side under the message."""

    name: str
    status: str
    message: str
    picture: tuple[Tensor, Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __repr__(self) -> str:
        return f"{_ICONS[self.status]} {self.name}: {self.message}"

    __str__ = __repr__

    def _repr_html_(self) -> str | None:
        """In a notebook: the message, then the expected and the learner's answer as
        pictures (None without a picture: Jupyter then shows the text)."""
        if self.picture is None:
            return None
        text = html.escape(repr(self))
        image = base64.b64encode(side_by_side_png(*self.picture)).decode("ascii")
        return f'<pre>{text}</pre><img alt="expected, yours" src="data:image/png;base64,{image}">'


def is_mask_or_index(got: Any, expected: Any) -> bool:
    """Whether a differing answer is a boolean mask or integer indices of the expected
    shape: those read better as a picture than as a list of positions."""
    return (
        isinstance(got, Tensor) and isinstance(expected, Tensor) and got.shape == expected.shape
        and got.dtype == expected.dtype and expected.dim() >= 1
        and (expected.dtype == torch.bool or not expected.dtype.is_floating_point)
    )  # fmt: skip


def side_by_side_png(expected: Tensor, got: Tensor) -> bytes:
    """A PNG: the expected answer, the learner's and where they differ, for the first 2-D
    slice (leading indices) where they differ."""
    from matplotlib.figure import Figure  # no pyplot: the notebook's own figures stay as they are

    expected, got = expected.detach().cpu(), got.detach().cpu()
    where = []
    while expected.dim() > 2:
        index = int((expected != got).flatten(1).any(1).nonzero()[0])
        expected, got, where = expected[index], got[index], [*where, index]
    if expected.dim() == 1:
        expected, got = expected[None], got[None]
    scale = dict(vmin=int(torch.minimum(expected.min(), got.min())),
                 vmax=int(torch.maximum(expected.max(), got.max())))  # fmt: skip
    figure = Figure(figsize=(9, 3.2))
    axes = figure.subplots(1, 3)
    panels = [("expected", expected), ("yours", got), ("where they differ", expected != got)]
    for ax, (title, values) in zip(axes, panels, strict=True):
        options = scale if title != "where they differ" else dict(vmin=0, vmax=1)
        ax.imshow(values.int(), cmap="Reds" if title == "where they differ" else "Greens",
                  interpolation="nearest", **options)  # fmt: skip
        ax.set_title(title)
    if where:
        figure.suptitle(f"index {where} of the leading axes")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()


def run_exercise(exercise: Exercise, fn: Callable[..., Any]) -> Verdict:
    """Check `fn` against `exercise` case by case; stop at the first problem. A failing
    verdict ends with a pointer to the exercise's hints."""
    verdict = _first_problem(exercise, fn)
    if verdict.status == FAIL and exercise.hints:
        stuck = say('Stuck? hint("{name}") gives the next hint.', name=exercise.name)
        message = f"{verdict.message}\n   {stuck}"
        return Verdict(verdict.name, FAIL, message, verdict.picture)
    return verdict


def _first_problem(exercise: Exercise, fn: Callable[..., Any]) -> Verdict:
    if exercise.prepare is not None:
        fn = exercise.prepare(fn)
    if not callable(fn):
        return Verdict(exercise.name, FAIL, say("expected a function, got {kind}.",
                                                kind=type(fn).__name__))
    cases = exercise.make_cases()
    for number, case in enumerate(cases, start=1):
        where = say("case {number} of {total} ({inputs})", number=number, total=len(cases),
                    inputs=case.describe(exercise.spec))
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
                message += "\n   " + say("Likely cause: {cause}", cause=translate(cause))
            return Verdict(exercise.name, FAIL, message)
        if not _same_inputs(args, case.args) or not _same_inputs(kwargs, case.kwargs):
            return Verdict(
                exercise.name,
                FAIL,
                f"{where}: " + say("your function changed its inputs in place; compute a new "
                                   "tensor instead (avoid `x *= ...`, `x.add_(...)`)."),
            )
        problem = compare(got, expected, exercise.atol, exercise.rtol)
        if problem:
            message = f"{where}: {problem}"
            cause = _likely_cause(exercise, got, expected, case)
            if cause:
                message += "\n   " + say("Likely cause: {cause}", cause=translate(cause))
            elif pattern := diagnose_difference(got, expected, exercise.atol, exercise.rtol):
                message += "\n   " + say("Where to look: {pattern}", pattern=pattern)
            picture = (expected, got) if is_mask_or_index(got, expected) else None
            return Verdict(exercise.name, FAIL, message, picture)
    return Verdict(exercise.name, PASS, say("all {total} cases match the reference.",
                                            total=len(cases)))


def compare(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5) -> str | None:
    """Describe how `got` differs from `expected` (type, shape, dtype, values); None if equal."""
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return say("returned {value}, expected a tuple of {count}.",
                       value=_describe_value(got), count=len(expected))
        for index, (part, wanted) in enumerate(zip(got, expected, strict=True)):
            problem = compare(part, wanted, atol, rtol)
            if problem:
                return f"output[{index}]: {problem}"
        return None
    if not isinstance(expected, Tensor):
        return None if got == expected else say("got {got}, expected {expected}.",
                                                got=repr(got), expected=repr(expected))
    if not isinstance(got, Tensor):
        return say("returned {kind}, expected a tensor of shape {shape}.",
                   kind=type(got).__name__, shape=_shape(expected))
    if got.shape != expected.shape:
        return say("output has shape {got}, expected {expected}.", got=_shape(got),
                   expected=_shape(expected))
    if got.dtype != expected.dtype:
        return say("output has dtype {got}, expected {expected}.", got=got.dtype,
                   expected=expected.dtype)
    differs = _differing(got, expected, atol, rtol)
    if not differs.any():
        return None
    return _describe_differences(got, expected, differs)


def _differing(got: Tensor, expected: Tensor, atol: float, rtol: float) -> Tensor:
    """Where two tensors of one shape and dtype differ (beyond the tolerance), as bools."""
    if not expected.is_floating_point():
        return got != expected
    return ~torch.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)


def _describe_differences(got: Tensor, expected: Tensor, differs: Tensor) -> str:
    count, total = int(differs.sum()), differs.numel()
    positions = differs.nonzero()[:3].tolist()
    shown = "; ".join(
        say("at {position} got {got}, expected {expected}", position=pos,
            got=_number(got[tuple(pos)]), expected=_number(expected[tuple(pos)]))
        for pos in positions
    )  # fmt: skip
    lines = [say("{count} of {total} values differ: {shown}.", count=count, total=total,
                 shown=shown)]  # fmt: skip
    broken = got.is_floating_point() and (~got.isfinite() & expected.isfinite()).any()
    if broken:
        what = "NaN" if got.isnan().any() else "inf"
        lines.append(say(
            "Your output contains {what} (a division by zero, a softmax over -inf only, or "
            "exp() of large scores that overflowed: subtract each row's maximum first?).",
            what=what,
        ))  # fmt: skip
    elif got.is_floating_point():
        error = (got - expected).abs().nan_to_num(nan=float("inf"))
        lines.append(say("Largest difference: {error}.", error=_number(error.max())))
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


# ---- generic diagnoses: where a wrong answer outside the catalogue still points ----------------


def diagnose_difference(
    got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-5
) -> str | None:
    """A pattern in how `got` differs from `expected` (same shape and dtype), in words:
    the transpose, a mask that shows too much or too little, a constant factor, a shift
    by a position or a block, or a single head (index) that differs. None if none fits."""
    if isinstance(expected, tuple) and isinstance(got, tuple) and len(got) == len(expected):
        for index, (part, wanted) in enumerate(zip(got, expected, strict=True)):
            if compare(part, wanted, atol, rtol):
                found = diagnose_difference(part, wanted, atol, rtol)
                return f"output[{index}]: {found}" if found else None
        return None
    if not isinstance(got, Tensor) or not isinstance(expected, Tensor):
        return None
    if got.shape != expected.shape or got.dtype != expected.dtype or expected.numel() < 2:
        return None

    close = _Close(atol, rtol)
    for diagnosis in (_transposed, _shifted, _mask_direction, _scaled, _one_index):
        found = diagnosis(got, expected, close)
        if found:
            return found
    return None


@dataclass(frozen=True)
class _Close:
    """Whether two tensors match within the exercise's tolerance."""

    atol: float
    rtol: float

    def __call__(self, a: Tensor, b: Tensor) -> bool:
        return compare(a, b, self.atol, self.rtol) is None


def _transposed(got: Tensor, expected: Tensor, close: _Close) -> str | None:
    """got equals expected with its last two axes swapped."""
    if got.ndim < 2 or got.shape[-1] != got.shape[-2] or not close(got, expected.mT):
        return None
    return say(
        "your output equals the reference transposed (its last two axes swapped): check "
        "which axis is the query and which the key."
    )


def _mask_direction(got: Tensor, expected: Tensor, close: _Close) -> str | None:
    """A boolean mask that only adds True entries, or only removes them."""
    if expected.dtype != torch.bool:
        return None
    extra, missing = got & ~expected, ~got & expected
    if extra.any() and not missing.any():
        first = extra.nonzero()[0].tolist()
        return say(
            "your mask differs only where the reference is False: it is True at "
            "{count} positions it must hide (the first at {first}).",
            count=int(extra.sum()), first=first,
        )
    if missing.any() and not extra.any():
        first = missing.nonzero()[0].tolist()
        return say(
            "your mask differs only where the reference is True: it hides "
            "{count} positions it must show (the first at {first}).",
            count=int(missing.sum()), first=first,
        )
    return None


def _scaled(got: Tensor, expected: Tensor, close: _Close) -> str | None:
    """got equals c * expected for one number c != 1 (the least-squares c)."""
    if not expected.is_floating_point() or not torch.isfinite(got).all():
        return None
    norm = expected.pow(2).sum()
    if norm == 0:
        return None
    factor = float((got * expected).sum() / norm)
    if abs(factor - 1) < 1e-3 or not close(got, factor * expected):
        return None
    return say(
        "your output is the reference times {factor}, everywhere: right up to a "
        "constant factor (a scale, a mean against a sum, a missing or extra division?).",
        factor=f"{factor:.4g}",
    )


def _shifted(got: Tensor, expected: Tensor, close: _Close) -> str | None:
    """got[..., i + s, ...] == expected[..., i, ...] along one axis, for the smallest |s|."""
    for shift in range(1, max(got.shape) // 2 + 1):
        for axis in range(got.ndim):
            size = got.shape[axis]
            if shift > size // 2 or size - shift < 3:  # too little overlap to tell
                continue
            for step in (shift, -shift):
                ahead = got.narrow(axis, max(step, 0), size - shift)
                behind = expected.narrow(axis, max(-step, 0), size - shift)
                same_place = expected.narrow(axis, max(step, 0), size - shift)
                if close(ahead, behind) and not close(ahead, same_place):
                    return _shift_message(axis, step)
    return None


def _shift_message(axis: int, step: int) -> str:
    """The shift found by `_shifted`, in words."""
    direction = say("later") if step > 0 else say("earlier")
    if abs(step) == 1:
        amount = say("one position")
    else:
        amount = say("{count} positions (one block?)", count=abs(step))
    return say(
        "your output is the reference shifted by {amount} along axis {axis}: what belongs "
        "at index i sits at index i {sign} {step} ({direction}). "
        "Look for an off-by-one in a position, a block number or a comparison (< against <=).",
        amount=amount, axis=axis, sign="+" if step > 0 else "-", step=abs(step),
        direction=direction,
    )


def _one_index(got: Tensor, expected: Tensor, close: _Close) -> str | None:
    """All the differences lie in some heads (axis 1 of a (b, h, n, d) tensor) or in
    one index of another axis (one query, one feature, ...)."""
    differs = _differing(got, expected, close.atol, close.rtol)
    if int(differs.sum()) == 1:
        return None  # one value: the positions in the message say it all
    for axis in range(got.ndim):
        others = [a for a in range(got.ndim) if a != axis]
        rows = differs.any(dim=others).nonzero().flatten().tolist() if others else []
        if axis == 1 and got.ndim >= 4 and len(rows) < got.shape[1]:
            if len(rows) == 1:
                which = say("head {head} differs", head=rows[0])
            else:
                which = say("heads {heads} differ", heads=rows)
            return say(
                "only {which} (axis 1); the other heads match: check how each query head "
                "finds its key/value or importance head (h // group, not h % kv_heads).",
                which=which,
            )
        if got.shape[axis] > 1 and len(rows) == 1:
            return say(
                "only index {index} along axis {axis} differs; the rest matches: look at "
                "what is special there (a first or last position, a partial block?).",
                index=rows[0], axis=axis,
            )
    return None


def _not_implemented_message(error: NotImplementedError) -> str:
    detail = f" ({error})" if str(error) else ""
    return say("not implemented yet{detail}. Replace the stub with your code, then check again.",
               detail=detail)


def _exception_message(error: Exception, where: str) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    message = f"{where}: " + say("your function raised {kind}: {line}",
                                 kind=type(error).__name__, line=first_line)
    line = _learner_line(error)
    if line:
        message += "\n   " + say("In your code: {line}", line=line)
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
    return say("line {number} of {function}: `{source}`", number=frame.lineno,
               function=frame.name, source=source)


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
    if isinstance(value, torch.nn.Module):  # its repr lists every layer: the class says enough
        return type(value).__name__
    return repr(value)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _number(t: Tensor) -> str:
    value = t.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)
