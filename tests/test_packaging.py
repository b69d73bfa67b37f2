"""The project's set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names a few packages differently from PyPI.
CONDA_NAME = {"pytorch": "torch"}


def pyproject_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["test"]
    return {re.split(r"[<>=!~ \[]", name, maxsplit=1)[0].lower() for name in names}


def environment_packages():
    names = set()
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        match = re.match(r"^\s+-\s+([A-Za-z0-9_.-]+)", line)
        if match and match.group(1) not in {"python", "pip", "-e"}:
            name = match.group(1).lower()
            names.add(CONDA_NAME.get(name, name))
    return names


def test_environment_yml_lists_the_same_packages_as_pyproject():
    assert environment_packages() == pyproject_packages()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    ci_commands = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
                   if line.strip() and not line.startswith("#")]
    assert "make test" in ci_commands


def test_torch_is_pinned_through_constraints_not_a_cpu_index():
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==", constraints, re.M)
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        assert "download.pytorch.org" not in (ROOT / name).read_text()


def test_notebooks_are_committed_without_outputs():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name
