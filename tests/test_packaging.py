"""The project's set-up files agree with each other."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names a few packages differently from PyPI.
CONDA_NAME = {"pytorch": "torch"}


def pyproject_requirements():
    """{name: specifier set} of pyproject.toml's dependencies and test extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in
                    project["dependencies"] + project["optional-dependencies"]["test"]]
    return {requirement.name.lower(): requirement.specifier for requirement in requirements}


def environment_requirements():
    """{name: specifier set} of environment.yml's conda dependencies (pip's "-e ." aside),
    under PyPI's names; python and pip included."""
    specs = {}
    text = (ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        match = re.match(r"^  -\s+([A-Za-z0-9_.-]+)\s*([<>=!~][^#]*)?$", line.rstrip())
        if match:
            name, spec = match.group(1).lower(), (match.group(2) or "").strip()
            if re.fullmatch(r"=[0-9.]+", spec):  # conda's "=3.11" means 3.11.*
                spec = f"={spec}.*"
            specs[CONDA_NAME.get(name, name)] = SpecifierSet(spec)
    return specs


def test_environment_yml_lists_the_same_packages_and_versions_as_pyproject():
    conda = environment_requirements()
    python, _ = conda.pop("python"), conda.pop("pip")
    assert conda == pyproject_requirements()
    # conda's Python lies inside pyproject's requires-python
    requires_python = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    pinned = re.fullmatch(r"==([0-9.]+)\.\*", str(python))
    assert pinned, f"environment.yml: python should name one minor version, got {python}"
    assert Version(pinned.group(1)) in requires_python, (str(python), str(requires_python))


def test_the_torch_pin_meets_both_torch_requirements():
    pins = re.findall(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, "constraints.txt: exactly one torch== pin"
    pin = Version(pins[0])
    assert pin in pyproject_requirements()["torch"], "pyproject.toml's torch requirement excludes the pin"
    assert pin in environment_requirements()["torch"], "environment.yml's pytorch requirement excludes the pin"


def readme_test_command():
    """The command on the README's fenced line that says it runs the test suite."""
    readme = (ROOT / "README.md").read_text()
    fenced = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.M | re.S))
    commands = [line.split("#", 1)[0].strip() for line in fenced.splitlines()
                if re.search(r"#.*\btest suite\b", line)]
    assert len(commands) == 1, f"README.md: one fenced command for the test suite, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command_and_nothing_exits_before_it():
    command = readme_test_command()
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert command in lines, f".ci/run does not run the README's test command {command!r}"
    for line in lines[:lines.index(command)]:
        assert not re.search(r"(^|[;&|]\s*)(exit|exec|return)\b", line), f".ci/run stops before the tests: {line!r}"


def makefile_recipe(target):
    """The recipe lines of ``target`` in the Makefile (continuation lines joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{target}:[^\n]*\n((?:\t[^\n]*\n?)*)", text, re.M)
    assert match, f"Makefile: no {target!r} target"
    return [line.strip() for line in match.group(1).splitlines()]


def test_make_test_runs_pytest_over_tests_and_nbval_over_the_notebooks():
    assert readme_test_command() == "make test"
    pytest_runs = [line.split() for line in makefile_recipe("test") if "-m pytest" in line]
    assert any("tests" in words for words in pytest_runs), "make test: no pytest over tests/"
    assert any("notebooks" in words and any(w.startswith("--nbval") for w in words) for words in pytest_runs), \
        "make test: no nbval over notebooks/"


def test_torch_is_pinned_through_constraints_not_a_cpu_index():
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        assert "download.pytorch.org" not in (ROOT / name).read_text()
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_notebooks_are_committed_without_outputs():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name
