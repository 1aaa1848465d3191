"""The kernels compiled for sm_90 (H100 / H200) on this machine, GPU or not, by
tests/compiled_kernels.py: what the interpreter lets through fails here."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.backends.nvidia.compiler")
import compiled_kernels  # noqa: E402  (tests/ is on sys.path)

KERNELS = Path(__file__).resolve().parents[1] / "nsa_tutorial" / "kernels"


def launched_kernels() -> set[str]:
    """Every kernel the package launches (`name[grid](...)` in nsa_tutorial/kernels)."""
    return {name for path in KERNELS.glob("*.py")
            for name in re.findall(r"\b(_\w+_kernel)\[", path.read_text())}  # fmt: skip


def test_every_kernel_compiles_for_sm90_within_its_shared_memory(tmp_path):
    report = tmp_path / "report.json"
    run = subprocess.run([sys.executable, compiled_kernels.__file__, "--json", str(report)],
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(report.read_text())
    assert {row["kernel"] for row in rows} == launched_kernels()
    assert all(isinstance(row["registers"], int) for row in rows)  # ptxas ran on each


def test_a_kernel_the_interpreter_runs_but_triton_cannot_compile_fails(tmp_path, monkeypatch):
    """A `return` inside a compile-time `if`, with code after it: the interpreter takes
    the branch like Python; the compiler compiles the code after it too, and fails."""
    (tmp_path / "early_return.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _first_column_kernel(X, OUT, WIDE: tl.constexpr):
            x = tl.load(X + tl.arange(0, 16))
            if not WIDE:
                tl.store(OUT + tl.arange(0, 16), x)
                return
            columns: tl.constexpr = x.shape[1]
            tl.store(OUT + tl.arange(0, columns), x)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import early_return  # the interpreter (on in this process) runs it as Python would

    x = torch.arange(16.0)
    out = torch.zeros(16)
    early_return._first_column_kernel[(1,)](x, out, WIDE=False)
    assert torch.equal(out, x)

    launch = {"module": "early_return", "kernel": "_first_column_kernel", "num_warps": 4,
              "num_stages": 3, "args": {"X": {"pointer": "fp32"}, "OUT": {"pointer": "fp32"},
                                        "WIDE": {"constant": False}}}  # fmt: skip
    compile_in_a_fresh_process = (
        "import json, os, sys; os.environ['TRITON_INTERPRET'] = '0'; "
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(Path(__file__).parent)!r}]; "
        "import compiled_kernels; print(json.dumps(compiled_kernels.compile_one("
        f"json.loads({json.dumps(launch)!r}))))"
    )
    run = subprocess.run([sys.executable, "-c", compile_in_a_fresh_process],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.splitlines()[-1])
    assert "index out of range" in row.get("error", ""), row
