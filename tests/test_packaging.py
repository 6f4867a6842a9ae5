"""The set-up files agree with each other and with the README."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_installs_the_project_with_its_extras_and_nothing_else():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "conda-forge" in env["channels"]
    deps = env["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert python and re.fullmatch(r"python=3\.\d+", python[0]), "pin the python version"
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict)]
    assert pip_sections == [['-e ".[dev]"']] or pip_sections == [["-e .[dev]"]]
    # every other conda dependency is python or pip: the package list lives in pyproject.toml only
    assert {d.split("=")[0] for d in deps if isinstance(d, str)} == {"python", "pip"}


def test_pyproject_declares_every_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    dev = {_requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    assert {"torch", "torchvision", "scikit-learn", "scipy", "numpy", "matplotlib", "tqdm",
            "pyyaml"} <= runtime
    assert {"pytest", "jupyter", "papermill", "nbval", "nbconvert"} <= dev


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "make test"):
        assert command in readme and command in ci
    assert "make reports" in readme
