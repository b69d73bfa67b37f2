"""The student edition: every notebook with its solutions taken out.

In a solved notebook an exercise is a code cell tagged ``exercise`` whose solution sits
between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (nbgrader's markers, so the
notebooks also work with nbgrader as they are). The student edition replaces each such
region, markers included, by ``raise NotImplementedError("your code here")`` at the same
indentation, clears every output, and leaves everything else as it is.

    python -m minimrcnn.course.student [--source notebooks] [--out build/student]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = 'raise NotImplementedError("your code here")'
EXERCISE_TAG = "exercise"


def stub_solutions(source: str, where: str = "cell") -> str:
    """``source`` with every solution region replaced by the stub line."""
    out, inside = [], False
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{where}, line {number}: {BEGIN!r} inside another solution region")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + STUB + ("\n" if line.endswith("\n") else ""))
        elif stripped == END:
            if not inside:
                raise ValueError(f"{where}, line {number}: {END!r} without {BEGIN!r}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN!r} without {END!r}")
    text = "".join(out)
    return text.rstrip("\n") if not source.endswith("\n") else text


def _source_text(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def student_notebook(notebook: dict, name: str = "notebook") -> dict:
    """A copy of a notebook (nbformat 4 JSON) as the student gets it."""
    notebook = json.loads(json.dumps(notebook))  # a deep copy
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        text = _source_text(cell)
        tags = cell.get("metadata", {}).get("tags", [])
        if BEGIN in text and EXERCISE_TAG not in tags:
            raise ValueError(f"{name}, cell {index}: a solution region in a cell not tagged {EXERCISE_TAG!r}")
        text = stub_solutions(text, f"{name}, cell {index}")
        cell["source"] = text.splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
    return notebook


def write_student_edition(source_dir: Path, out_dir: Path) -> list[Path]:
    """Convert every notebook in ``source_dir`` into ``out_dir``; returns the files written."""
    paths = sorted(Path(source_dir).glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks in {source_dir}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        notebook = student_notebook(json.loads(path.read_text(encoding="utf-8")), path.name)
        target = out_dir / path.name
        target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                          encoding="utf-8")
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimrcnn.course.student", description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="notebooks", help="folder of the solved notebooks")
    parser.add_argument("--out", default="build/student", help="folder for the student edition")
    args = parser.parse_args(argv)
    try:
        written = write_student_edition(Path(args.source), Path(args.out))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    exercises = sum(json.loads(p.read_text(encoding="utf-8")).__str__().count(STUB) for p in written)
    print(f"wrote {len(written)} student notebooks ({exercises} exercises) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
