"""The set-up files agree: pins, the README's commands, and CI."""

import re

import tomllib
import yaml

from nsa_tutorial.course.notebooks import ROOT


def pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def test_every_dependency_is_pinned_exactly():
    for requirement in pyproject_pins():
        assert re.match(r"^[\w.-]+==[\w.]+(; .+)?$", requirement), requirement


def test_torch_and_triton_pins_move_together():
    pins = pyproject_pins()
    assert "torch==2.13.0" in pins
    assert "triton==3.7.1; sys_platform == 'linux'" in pins


def test_environment_yml_pins_what_pyproject_pins():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    (pip_section,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert set(pip_section) == set(pyproject_pins()) | {"-e .[dev]"}


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
