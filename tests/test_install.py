"""`pip install .` gives a library that works with its runtime dependencies alone.

The test builds the package's wheel, installs it with --no-deps into a fresh virtual
environment, and gives that environment exactly the files of the distributions the
wheel's metadata requires (and theirs, recursively), linked from this environment, so
no download is needed. Nothing else is importable there: not JupyterLab, matplotlib,
ipywidgets, pytest, not even pip.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nsa_tutorial.course.notebooks import ROOT

COURSE_ONLY = (
    "matplotlib",
    "ipywidgets",
    "jupyterlab",
    "ipykernel",
    "IPython",
    "nbformat",
    "nbclient",
    "nbval",
    "pytest",
    "yaml",
    "native_sparse_attention_pytorch",
    "pip",
)


def dependency_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions these requirements need here, recursively."""
    found: dict[str, metadata.Distribution] = {}
    extras: dict[str, set[str]] = {}
    todo = [(Requirement(line), {""}) for line in requirements]
    while todo:
        requirement, parent_extras = todo.pop()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        wanted = {""} | requirement.extras
        if name in found and wanted <= extras[name]:
            continue
        try:
            found[name] = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement} is not installed here (run make)")
        extras[name] = extras.get(name, set()) | wanted
        todo += [(Requirement(line), extras[name]) for line in found[name].requires or []]
    return found


def link_files(distribution: metadata.Distribution, site_packages: Path) -> None:
    """Symlink each file of an installed distribution (its RECORD) into site_packages."""
    assert distribution.files, f"{distribution.metadata['Name']} lists no files"
    for file in distribution.files:
        if file.parts[0] == "..":  # console scripts, outside site-packages
            continue
        target = site_packages / file
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(distribution.locate_file(file)).resolve())


@pytest.fixture(scope="module")
def lean_environment(tmp_path_factory) -> tuple[Path, list[str]]:
    """A fresh venv holding nsa-tutorial's wheel and only its runtime dependencies;
    returns its python and the wheel's requirements."""
    tmp = tmp_path_factory.mktemp("lean")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "nsa_tutorial", source / "nsa_tutorial", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    options = ["--no-deps", "--no-index", "--no-build-isolation"]
    subprocess.run([*pip, "wheel", *options, "-w", tmp / "wheel", source], check=True)
    (wheel,) = (tmp / "wheel").glob("nsa_tutorial-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", *options, wheel], check=True)
    site_packages = Path(
        subprocess.run(
            [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (info,) = site_packages.glob("nsa_tutorial-*.dist-info")
    requirements = metadata.PathDistribution(info).requires or []
    runtime = [line for line in requirements if "extra ==" not in line]
    for distribution in dependency_closure(runtime).values():
        link_files(distribution, site_packages)
    return python, requirements


def test_the_wheel_requires_only_the_runtime_dependencies(lean_environment):
    _, requirements = lean_environment
    runtime = {canonicalize_name(Requirement(r).name) for r in requirements if "extra ==" not in r}
    assert runtime == {"torch", "einops", "triton", "numpy"}


def test_sparse_attention_forward_and_backward_with_runtime_dependencies_only(lean_environment):
    python, _ = lean_environment
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, warnings

        course_only = {COURSE_ONLY!r}
        present = [name for name in course_only if importlib.util.find_spec(name)]
        assert not present, f"not a lean environment: {{present}}"

        warnings.simplefilter("error")  # importing the library warns about nothing, except
        # torch where numpy, which it does not declare, is not installed (no Triton there)
        warnings.filterwarnings("ignore", "Failed to initialize NumPy")
        import nsa_tutorial
        from nsa_tutorial import SparseAttention
        warnings.resetwarnings()
        assert "site-packages" in nsa_tutorial.__file__, nsa_tutorial.__file__
        tooling = ("nsa_tutorial.course", "nsa_tutorial.viz")
        assert not [m for m in sys.modules if m.startswith(tooling)]

        import torch
        torch.manual_seed(0)
        attention = SparseAttention(
            dim=32, dim_head=8, heads=4, kv_heads=2, sliding_window_size=8,
            compress_block_size=8, compress_block_sliding_stride=4,
            selection_block_size=8, num_selected_blocks=2, causal=True,
        )
        x = torch.randn(1, 64, 32, requires_grad=True)
        out = attention(x)
        assert out.shape == x.shape and out.isfinite().all()
        out.square().sum().backward()
        assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
        grads = [p.grad for p in attention.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)

        if sys.platform == "linux":  # Triton (in its interpreter on a CPU) runs a kernel
            from nsa_tutorial.kernels import TRITON_AVAILABLE
            assert TRITON_AVAILABLE, "triton is installed but does not import"
            from nsa_tutorial.kernels.smoke import triton_add
            a, b = torch.arange(100.0), torch.full((100,), 0.5)
            assert torch.equal(triton_add(a, b), a + b)

        try:
            import nsa_tutorial.viz
        except ImportError as error:
            assert "nsa-tutorial[course]" in str(error), error
        else:
            raise AssertionError("nsa_tutorial.viz imported without matplotlib")
        print("lean ok")
        """
    )
    result = subprocess.run(
        [python, "-I", "-c", script],
        capture_output=True,
        text=True,
        cwd=python.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lean ok"
