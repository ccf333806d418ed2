"""environment.yml must be a working conda environment for the same dependencies as pyproject.toml."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_environment_yml_names_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))

    assert env["name"] == "lora-lab"
    assert any(d.startswith("python") for d in conda) and "pip" in conda
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    listed = {p for p in pip if not p.startswith("-e")}
    assert listed == wanted  # same names and the same version ranges
    assert "-e ." in pip  # and the package itself


def test_python_pin_satisfies_requires_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    minimum = tuple(int(x) for x in project["requires-python"].removeprefix(">=").split("."))
    pinned = tuple(int(x) for x in python.split("=")[-1].split("."))
    assert pinned >= minimum


def test_torch_range_admits_the_versions_we_support():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(d for d in project["dependencies"] if _name(d) == "torch")
    lower = re.search(r">=([\d.]+)", torch_req).group(1)
    upper = re.search(r"<([\d.]+)", torch_req).group(1)
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    for version in ("2.11", "2.13"):
        assert as_tuple(lower) <= as_tuple(version) < as_tuple(upper)


def test_ci_installs_pinned_torch_first_and_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```(?:bash|sh)?\n(python -m pytest [^\n]*)\n```", readme).group(1)
    assert command in ci.splitlines()
    assert ci.index('"torch==2.13.0"') < ci.index('-e ".[test]"')
