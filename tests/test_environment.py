"""The environment check of notebook 00, and the course without Triton."""

import os
import subprocess
import sys

from nsa_tutorial.course.environment import (
    MISSING,
    OK,
    WARN,
    check_package,
    check_python,
    check_triton,
    environment_report,
    pinned_versions,
)
from nsa_tutorial.course.notebooks import SOLUTIONS


def test_this_machine_is_ready():
    report = environment_report()
    assert report.ready, repr(report)
    assert repr(report).endswith("Ready for the course.")


def test_pins_are_read_from_the_package_metadata():
    pins = pinned_versions()
    assert pins["torch"] == "2.13.0" and pins["triton"] == "3.7.1"


def test_python_too_old_says_what_to_install():
    assert check_python((3, 11)).status == OK
    finding = check_python((3, 9))
    assert finding.status == MISSING and "3.10 or newer" in finding.remedy


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


NO_TRITON = """
import sys
sys.modules["triton"] = None  # as on macOS, where Triton cannot be installed
import nbformat
import nsa_tutorial
from nsa_tutorial.kernels import TRITON_AVAILABLE, triton_mode
from nsa_tutorial.course.environment import environment_report
assert not TRITON_AVAILABLE and triton_mode() == "missing"
print(environment_report())
for path in sys.argv[1:]:
    namespace = {}
    for cell in nbformat.read(path, 4).cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
    print("ran", path)
"""


def test_package_and_non_triton_notebooks_run_without_triton():
    notebooks = sorted(str(p) for p in SOLUTIONS.glob("0[0-7]_*.ipynb"))
    result = subprocess.run(
        [sys.executable, "-c", NO_TRITON, *notebooks],
        cwd=SOLUTIONS,  # notebooks run from their own folder, as in JupyterLab
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert result.returncode == 0, result.stderr
    assert "Triton: not installed" in result.stdout
    assert result.stdout.count("ran ") == len(notebooks)
