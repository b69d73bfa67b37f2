"""Training metrics as JSON lines, read back and drawn as a loss curve.

One line per logging period: ``{"iteration", "lr", "time", "loss", "loss_objectness", ...}``
with the losses averaged over the period. A resumed run first drops the lines past its
checkpoint, so the file never holds two histories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from minimrcnn.modeling.model import LOSS_NAMES, SEMANTIC_LOSS_NAME  # the model names its losses; one list for both

OPTIONAL_LOSS_NAMES = (SEMANTIC_LOSS_NAME,)  # only some models have them (Panoptic FPN's semantic branch)
FEW_POINTS = 20  # below this many records, mark each point (a single one draws no line)


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (line-buffered, so a crash loses at most a line)."""

    def __init__(self, path, resume_from_iteration: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_iteration is None:
            self.path.write_text("")
        else:
            kept = [record for record in read_metrics(self.path)
                    if record.get("iteration", 0) <= resume_from_iteration]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self._handle = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics file; an incomplete last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(records: list[dict], path, title: str = "training losses") -> Path:
    """Each loss and their sum against the iteration (log scale), saved as a PNG."""
    # A bare Figure, not pyplot: no backend switch, no window, nothing left open in a notebook.
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(6, 3.6), dpi=100)
    axes = figure.subplots()
    iterations = [record["iteration"] for record in records]
    for name in ("loss", *LOSS_NAMES, *OPTIONAL_LOSS_NAMES):
        values = [record.get(name, math.nan) for record in records]
        if any(math.isfinite(v) and v > 0 for v in values):
            axes.plot(iterations, values, label=name, linewidth=2.0 if name == "loss" else 1.0,
                      marker="o" if len(records) < FEW_POINTS else None, markersize=3)
    axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    if records:
        axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
