"""The package's layers: ``data`` and ``evaluation`` import neither ``modeling`` nor ``engine``.

Read from the source (an AST scan of every import statement, including those inside
functions), so a lazy import inside a function is caught as well as a top-level one.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minimrcnn"
# What each low layer may import: outside the package anything listed, inside it only these.
ALLOWED = {
    "data": {"external": {"__future__", "contextlib", "io", "json", "numbers", "warnings", "pathlib",
                          "math", "multiprocessing", "concurrent", "os", "shutil", "dataclasses", "typing", "time",
                          "numpy", "torch", "PIL", "pycocotools"},
             # the COCO panoptic format (segment-id codec, PNG I/O) is written once, in evaluation
             "internal": {"minimrcnn.data", "minimrcnn.evaluation.panoptic_io"}},
    # PIL only for the COCO panoptic PNGs (panoptic_io.py)
    "evaluation": {"external": {"__future__", "collections", "contextlib", "copy", "io", "json", "os", "pathlib",
                                "dataclasses", "typing", "math", "numpy", "pycocotools", "PIL"},
                   "internal": {"minimrcnn.evaluation", "minimrcnn.ops"}},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
    return found


def violations(layer: str) -> list[str]:
    rules = ALLOWED[layer]
    problems = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top == "minimrcnn":
                if not any(module == allowed or module.startswith(allowed + ".") for allowed in rules["internal"]):
                    problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
            elif top not in rules["external"]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_low_layers_import_only_what_they_may(layer):
    assert violations(layer) == []


def test_the_scan_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The scanner itself: a lazy ``from minimrcnn.engine ...`` inside a function is reported."""
    fake = tmp_path / "minimrcnn" / "evaluation"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("import numpy\n\ndef f():\n    from minimrcnn.engine.train import train\n"
                                 "    from ..modeling import model\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "minimrcnn")
    assert violations("evaluation") == ["minimrcnn/evaluation/bad.py:4 imports minimrcnn.engine.train",
                                        "minimrcnn/evaluation/bad.py:5 imports minimrcnn.modeling"]


def test_evaluation_and_data_load_without_modeling_or_engine():
    """Importing the two packages in a fresh interpreter loads no module of modeling or engine."""
    import subprocess
    import sys

    code = ("import sys, minimrcnn.evaluation, minimrcnn.data, minimrcnn.evaluation.coco_ap;"
            "print([m for m in sys.modules if m.startswith(('minimrcnn.modeling', 'minimrcnn.engine'))])")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout
    assert output.strip() == "[]"
