"""The environment check of notebook 00: versions, device and Triton, each with a remedy.

Each `check_*` function takes plain facts and returns a `Finding`, so the remedies
can be tested without changing the machine; `environment_report` gathers the real facts.
"""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OK, WARN, MISSING = "ok", "warn", "missing"
_ICONS = {OK: "✅", WARN: "⚠️", MISSING: "❌"}
LOCK = Path(__file__).resolve().parents[2] / "requirements.txt"  # the course's exact versions
REINSTALL = "run `make lab` again from the repository root (it reinstalls .venv)"


@dataclass(frozen=True)
class Finding:
    topic: str
    status: str
    detail: str
    remedy: str = ""

    def __str__(self) -> str:
        line = f"{_ICONS[self.status]} {self.topic}: {self.detail}"
        return f"{line}\n     -> {self.remedy}" if self.remedy else line


@dataclass(frozen=True)
class Report:
    findings: tuple[Finding, ...]

    @property
    def ready(self) -> bool:
        return all(f.status != MISSING for f in self.findings)

    def __repr__(self) -> str:
        summary = "Ready for the course." if self.ready else "Fix the ❌ lines first."
        return "\n".join([*map(str, self.findings), summary])


def check_python(version: tuple[int, int]) -> Finding:
    text = ".".join(map(str, version))
    if version >= (3, 11):
        return Finding("Python", OK, text)
    return Finding("Python", MISSING, f"{text} is too old", "install Python 3.11 or newer")


def check_package(name: str, installed: str | None, pinned: str | None) -> Finding:
    """Compare an installed version with the course's pin (local tags like +cpu ignored)."""
    if installed is None:
        return Finding(name, MISSING, "not installed", REINSTALL)
    if pinned is not None and installed.split("+")[0] != pinned:
        return Finding(
            name, WARN, f"{installed}, but the course is tested with {pinned}", REINSTALL
        )
    return Finding(name, OK, installed)


def check_device(cuda_available: bool, gpu_name: str | None) -> Finding:
    if cuda_available:
        return Finding("device", OK, f"CUDA GPU: {gpu_name}")
    return Finding(
        "device",
        OK,
        "CPU only: every notebook runs; Triton kernels run in the interpreter, "
        "on small shapes (notebooks 08-09 are faster on a CUDA GPU)",
    )


def check_triton(mode: str, smoke_test_passed: bool | None, system: str) -> Finding:
    """mode is nsa_tutorial.kernels.triton_mode(); the smoke test ran a tiny kernel."""
    if mode == "missing":
        remedy = (
            "Triton has no wheels for macOS or Windows: notebooks 08-09 explain the kernels but "
            "skip running them; every other notebook works. Use Linux (or a Linux container) "
            "to run them."
            if system != "Linux"
            else REINSTALL
        )
        return Finding("Triton", WARN if system != "Linux" else MISSING, "not installed", remedy)
    how = "compiles for the GPU" if mode == "compiled" else "runs in interpreter mode (CPU)"
    if not smoke_test_passed:
        return Finding(
            "Triton",
            MISSING,
            f"{how}, but a tiny test kernel gave a wrong answer or failed",
            "reinstall with `make lab`; if it persists, open an issue with this report",
        )
    return Finding("Triton", OK, f"{how}; a test kernel ran correctly")


class TritonMissing(RuntimeError):
    """Stops a kernel notebook where Triton is not installed. Jupyter shows only the
    message, no traceback, and "Run All" stops at the cell that raised it."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"⚠️  {self}"]


def require_triton() -> str:
    """The Triton mode, "compiled" or "interpreter", for the first cell of notebooks 08-09;
    where Triton is missing, stop the notebook with a message that says why and what to do;
    where it was imported too early for its interpreter, say so."""
    from nsa_tutorial.kernels import require_runnable_kernels, triton_mode

    mode = triton_mode()
    if mode == "missing":
        remedy = check_triton(mode, None, platform.system()).remedy.rstrip(".")
        raise TritonMissing(
            f"Triton is not installed, so this notebook stops here: the cells below run "
            f"Triton kernels. You can still read it (solutions/ has every output). "
            f"{remedy[:1].upper()}{remedy[1:]}."
        )
    require_runnable_kernels()
    return mode


def pinned_versions(lock: Path = LOCK) -> dict[str, str]:
    """The course's exact pins (==) from its lock file, by distribution name; none where
    the lock is not there (the library installed on its own)."""
    if not lock.exists():
        return {}
    pins = {}
    for line in lock.read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", line):
            pins[match.group(1).lower()] = match.group(2)
    return pins


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_triton_smoke_test() -> bool:
    import torch

    from nsa_tutorial.kernels.smoke import triton_add

    x, y = torch.arange(100.0), torch.full((100,), 0.5)
    try:
        return torch.equal(triton_add(x, y), x + y)
    except Exception:
        return False


def environment_report() -> Report:
    """Check this machine for the course and say how to fix what is missing."""
    import torch

    from nsa_tutorial.kernels import triton_mode

    pins = pinned_versions()
    findings = [check_python(sys.version_info[:2])]
    for name in ("torch", "triton", "einops", "matplotlib", "ipywidgets", "jupyterlab"):
        if name == "triton" and platform.system() != "Linux":
            continue
        findings.append(check_package(name, installed_version(name), pins.get(name)))
    cuda = torch.cuda.is_available()
    findings.append(check_device(cuda, torch.cuda.get_device_name() if cuda else None))
    mode = triton_mode()
    smoke = run_triton_smoke_test() if mode != "missing" else None
    findings.append(check_triton(mode, smoke, platform.system()))
    return Report(tuple(findings))
