"""The environment check of notebook 00, and the course without Triton."""

import os
import subprocess
import sys

import pytest

import nsa_tutorial.kernels
from nsa_tutorial.course.environment import (
    MISSING,
    OK,
    WARN,
    TritonMissing,
    check_package,
    check_python,
    check_triton,
    environment_report,
    pinned_versions,
    require_triton,
)
from nsa_tutorial.course.notebooks import SOLUTIONS


def test_this_machine_is_ready():
    report = environment_report()
    assert report.ready, repr(report)
    assert repr(report).endswith("Ready for the course.")


def test_pins_are_read_from_the_lock(tmp_path):
    pins = pinned_versions()
    assert pins["torch"] == "2.13.0" and pins["triton"] == "3.7.1"
    assert pinned_versions(tmp_path / "missing.txt") == {}  # the library alone: no pins


def test_python_too_old_says_what_to_install():
    assert check_python((3, 11)).status == OK
    finding = check_python((3, 10))
    assert finding.status == MISSING and "3.11 or newer" in finding.remedy


def test_package_versions_against_pins():
    assert check_package("torch", "2.13.0+cpu", "2.13.0").status == OK
    other = check_package("torch", "2.12.1", "2.13.0")
    assert (
        other.status == WARN and "tested with 2.13.0" in other.detail and "make lab" in other.remedy
    )
    assert check_package("einops", None, "0.8.2").status == MISSING


def test_triton_findings_have_remedies():
    mac = check_triton("missing", None, "Darwin")
    assert (
        mac.status == WARN
        and "notebooks 08-09" in mac.remedy
        and "every other notebook" in mac.remedy
    )
    assert check_triton("missing", None, "Linux").status == MISSING
    broken = check_triton("interpreter", False, "Linux")
    assert broken.status == MISSING and "reinstall" in broken.remedy
    assert "compiles for the GPU" in check_triton("compiled", True, "Linux").detail


def test_kernel_notebooks_stop_with_a_message_where_triton_is_missing(monkeypatch):
    assert require_triton() in ("compiled", "interpreter")
    monkeypatch.setattr(nsa_tutorial.kernels, "triton_mode", lambda: "missing")
    monkeypatch.setattr("platform.system", lambda: "Darwin")
    with pytest.raises(TritonMissing, match="this notebook stops here") as stop:
        require_triton()
    assert "no wheels for macOS" in str(stop.value)
    (shown,) = stop.value._render_traceback_()  # what Jupyter shows: the message, no traceback
    assert shown.startswith("⚠️") and "Traceback" not in shown


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as on macOS, where Triton cannot be installed
import nbformat
import nsa_tutorial
from nsa_tutorial.kernels import TRITON_AVAILABLE, triton_mode
from nsa_tutorial.course.environment import TritonMissing, environment_report
assert not TRITON_AVAILABLE and triton_mode() == "missing"
print(environment_report())
for path in sys.argv[1:]:
    namespace = {}
    try:
        for cell in nbformat.read(path, 4).cells:
            if cell.cell_type == "code":
                exec(cell.source, namespace)
    except TritonMissing as stop:  # the kernel notebooks stop at their first cell
        print("stopped", path, stop)
        continue
    print("ran", path)
"""


def test_the_notebooks_run_or_stop_politely_without_triton():
    notebooks = sorted(SOLUTIONS.glob("*.ipynb"))
    kernel_notebooks = [p for p in notebooks if "require_triton()" in p.read_text()]
    assert "08" in [p.name[:2] for p in kernel_notebooks]
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON, *map(str, notebooks)],
        cwd=SOLUTIONS,  # notebooks run from their own folder, as in JupyterLab
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "Triton: not installed" in result.stdout
    assert result.stdout.count("ran ") == len(notebooks) - len(kernel_notebooks)
    for path in kernel_notebooks:
        assert (
            f"stopped {path} Triton is not installed, so this notebook stops here" in result.stdout
        )
