"""The set-up files agree: the lock, pyproject's ranges, environment.yml, the README's
commands, and CI."""

import ast
import re
import sys
from importlib import metadata

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nsa_tutorial.course.notebooks import ROOT

LOCK = ROOT / "requirements.txt"
PACKAGE = ROOT / "nsa_tutorial"
# Course tooling, never imported by `import nsa_tutorial`: it may need the course extra.
COURSE_TOOLING = (PACKAGE / "course", PACKAGE / "viz.py")


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def runtime_requirements() -> list[Requirement]:
    return [Requirement(line) for line in project()["dependencies"]]


def extra_requirements(*extras: str) -> list[Requirement]:
    return [Requirement(line) for e in extras for line in project()["optional-dependencies"][e]]


def lock_lines() -> list[str]:
    lines = (line.strip() for line in LOCK.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pins() -> list[Requirement]:
    return [Requirement(line) for line in lock_lines()]


def pins_here() -> dict[str, Requirement]:
    """The lock's pins that apply to this Python and platform, by package."""
    here = {}
    for pin in pins():
        if pin.marker is None or pin.marker.evaluate():
            name = canonicalize_name(pin.name)
            assert name not in here, f"two pins of {name} apply here"
            here[name] = pin
    return here


def version(pin: Requirement) -> str:
    (exact,) = pin.specifier
    return exact.version


def test_the_lock_pins_every_package_exactly():
    lines = lock_lines()
    for line in lines:
        assert re.match(r"^[a-z0-9-]+==[\w.]+(; .+)?$", line), line
    assert len(set(lines)) == len(lines)
    names = [canonicalize_name(pin.name) for pin in pins()]
    twice = {name for name in names if names.count(name) > 1}
    assert twice <= {"soupsieve"}, "a package has two pins (only by Python version)"
    linux_only = {"triton"} if sys.platform != "linux" else set()
    assert set(names) - set(pins_here()) == linux_only, "every package has a pin here"


def test_torch_and_triton_pins_move_together():
    lines = lock_lines()
    assert "torch==2.13.0" in lines
    assert "triton==3.7.1; sys_platform == 'linux'" in lines


def test_the_lock_holds_every_dependency_within_pyproject_ranges():
    """`pip install -r requirements.txt -e '.[course,dev]'` takes every version from the
    lock, and pyproject's ranges admit each of them, on the platforms they name."""
    for requirement in runtime_requirements() + extra_requirements("course", "dev"):
        name = canonicalize_name(requirement.name)
        matching = [pin for pin in pins() if canonicalize_name(pin.name) == name]
        assert len(matching) == 1, f"{requirement.name}: {len(matching)} pins in requirements.txt"
        (pin,) = matching
        assert requirement.specifier.contains(version(pin)), (requirement, str(pin))
        assert pin.marker is None or pin.marker == requirement.marker, (requirement, str(pin))


def test_the_lock_is_complete():
    """Every dependency of a locked package (with the extras asked for, as installed
    here) is locked too, but for the CUDA libraries (nvidia-*, cuda-*) of torch's CUDA
    build, which the lock leaves to torch."""
    locked = {canonicalize_name(pin.name) for pin in pins()}
    extras = {name: {""} for name in locked}
    todo = list(pins_here())
    while todo:
        name = todo.pop()
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in extras[name]):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency.startswith(("nvidia-", "cuda-")):
                continue
            assert dependency in locked, f"{name} needs {line}, which requirements.txt lacks"
            if not requirement.extras <= extras[dependency]:
                extras[dependency] |= requirement.extras
                todo.append(dependency)


def test_this_environment_is_the_lock():
    """The tests run against the locked versions (a CPU or CUDA build of torch alike)."""
    wrong = {}
    for name, pin in pins_here().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not pin.specifier.contains(installed):
            wrong[name] = (installed, str(pin.specifier))
    assert not wrong, f"installed versions differ from requirements.txt (run make): {wrong}"


def third_party_imports(paths) -> set[str]:
    """Top-level names imported anywhere in these files (in functions too), less the
    standard library and nsa_tutorial itself."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"nsa_tutorial"}


def library_files():
    return [
        path
        for path in PACKAGE.rglob("*.py")
        if not any(path == tool or tool in path.parents for tool in COURSE_TOOLING)
    ]


def test_runtime_dependencies_are_what_the_library_imports():
    """pyproject's dependencies are ranges, and exactly the library's imports (course
    tooling aside), plus numpy on Linux: Triton's interpreter, which runs the kernels
    on a CPU, imports it without declaring it."""
    requirements = runtime_requirements()
    for requirement in requirements:
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), requirement
    declared = {canonicalize_name(r.name) for r in requirements}
    assert third_party_imports(library_files()) | {"numpy"} == declared
    linux_only = {canonicalize_name(r.name) for r in requirements if r.marker is not None}
    assert linux_only == {"triton", "numpy"}
    for requirement in requirements:
        if requirement.marker is not None:
            assert str(requirement.marker) == 'sys_platform == "linux"', requirement


def test_course_tooling_imports_are_declared():
    """nsa_tutorial.course and nsa_tutorial.viz import only what `[course]` and the
    runtime dependencies install."""
    distributions = metadata.packages_distributions()
    tooling = [PACKAGE / "viz.py", *(PACKAGE / "course").rglob("*.py")]
    needed = {
        canonicalize_name(distributions[name][0]) for name in third_party_imports(tooling)
    }
    declared = {
        canonicalize_name(r.name) for r in runtime_requirements() + extra_requirements("course")
    }
    assert needed <= declared, needed - declared


def test_environment_yml_installs_the_lock():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    (pip_section,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert pip_section == ["-r requirements.txt", "-e .[course,dev]"]
    assert "python=3.11" in conda


def test_make_installs_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements.txt" in makefile
    assert "$(INSTALLED): pyproject.toml $(LOCK)" in makefile
    assert "pip install --quiet -r $(LOCK) -e '.[course,dev]'" in makefile


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:sh|bash)\n(.*?)```", readme, flags=re.S)
    setup = [line for block in commands[:1] for line in block.splitlines() if line.strip()]
    assert setup == ["make lab", "make test"], "the README's first block holds the two commands"
    ci = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"]
