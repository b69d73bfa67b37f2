"""The paper's Table 2 ablations as measured experiments: the baseline and each switch trained
on the same data, at the same budget, over several seeds, in one resumable table.

    python -m minimrcnn ablate --iterations 200 --seeds 3 --out runs/ablate
    python -m minimrcnn ablate --time-budget 8 --seeds 3 --only baseline,roipool
    python -m minimrcnn ablate --iterations 600 --seeds 3 --jobs 2 --threads 1   # two runs at a time

Each run is ``train()`` in a child process (so that its peak memory is its own), in
``OUT/runs/<row>-s<seed>/``. ``OUT/runs.json`` holds the settings and every finished run; a
second call with the same settings skips the finished runs and redoes only an interrupted
one. ``OUT/table.md`` is rewritten after every run: mean +- std over the seeds of segm AP,
AP50, AP75, APs, bbox AP, iterations, seconds per iteration and peak memory, the paper's
numbers for the same switch, and whether the direction of the paper's effect reproduces.

The rule for "direction reproduces?" (written in the table too): d = mean(row) - mean(baseline)
of segm AP, se = sqrt(s_row^2 / n_row + s_base^2 / n_base) with s the sample std over seeds,
t = d / se. Where the paper's own difference is at least 0.5 AP: "yes" if d has the paper's
sign and |t| >= 2, "opposite" if the other sign and |t| >= 2, "not resolved" if |t| < 2. Where the
paper saw no difference (|paper d| < 0.5, e.g. RoIAlign max vs average): "yes (no difference)"
if |t| < 2, else "no". A rough two-sample criterion for 3 seeds, not a significance test.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from minimrcnn.config import Config, get_config

# Paper, Table 2: (table, ablated mask AP/AP50/AP75, the baseline it is compared with). None: not in the paper.
R50_C4_ALIGN = (30.3, 51.2, 31.5)
R50_FPN = (33.6, 55.2, 35.3)
# row -> (config changes, what the paper compares, ablated numbers, baseline numbers)
ROWS: dict[str, tuple[dict, str, tuple | None, tuple | None]] = {
    "baseline": ({}, "2a R50-FPN (our baseline: FPN, RoIAlign, sigmoid, FCN)", R50_FPN, R50_FPN),
    "roipool": ({"roi_op": "pool"}, "2c RoIPool vs RoIAlign (C4)", (26.9, 48.8, 26.4), R50_C4_ALIGN),
    "roiwarp": ({"roi_op": "warp"}, "2c RoIWarp ave vs RoIAlign (C4)", (27.1, 48.9, 27.1), R50_C4_ALIGN),
    "roiwarp_max": ({"roi_op": "warp_max"}, "2c RoIWarp max vs RoIAlign ave (C4)", (27.2, 49.2, 27.1),
                    R50_C4_ALIGN),
    "roialign_max": ({"roi_op": "align_max"}, "2c RoIAlign max vs ave (C4)", (30.2, 51.0, 31.8), R50_C4_ALIGN),
    "softmax": ({"mask_loss": "softmax"}, "2b softmax vs sigmoid (C4)", (24.8, 44.1, 25.1), R50_C4_ALIGN),
    "class_agnostic": ({"mask_class_agnostic": True}, "2b class-agnostic vs specific (C4)", (29.7, None, None),
                       R50_C4_ALIGN),
    "mlp": ({"mask_head": "mlp"}, "2e MLP vs FCN mask head (FPN)", (31.5, 53.7, 32.8), R50_FPN),
    "mask28": (None, "not in Table 2 (the other mask resolution)", None, None),  # set from the base config
    "c4": ({"backbone_fpn": False}, "2a R50-C4 vs R50-FPN", R50_C4_ALIGN, R50_FPN),
}
PAPER_NO_EFFECT = 0.5  # mask AP points: a smaller paper difference counts as "no difference"
T_THRESHOLD = 2.0
REPORTED = (("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"), ("segm", "APs"), ("bbox", "AP"))


def row_changes(name: str, base: Config) -> dict:
    """Config changes of a row; "mask28" flips the base's mask resolution (14 <-> 28)."""
    if name not in ROWS:
        raise ValueError(f"--only: unknown row {name!r}; rows are {', '.join(ROWS)}")
    if name == "mask28":
        other = 2 * base.mask_pool_size if base.mask_resolution == base.mask_pool_size else base.mask_pool_size
        return {"mask_resolution": other}
    return dict(ROWS[name][0])


def run_one(config_dict: dict, out_dir: str, data_root: str, iterations: int | None,
            time_budget: float | None, device: str | None, threads: int | None,
            val_images: str | None = None, val_annotations: str | None = None) -> dict:
    """One training run (in the child process): train + evaluate; returns the run's record."""
    import resource

    import torch

    from minimrcnn.engine.checkpoint import config_from_dict
    from minimrcnn.engine.train import train

    if threads:
        torch.set_num_threads(threads)
    config = config_from_dict(config_dict, source=f"{out_dir}/spec.json")
    summary = train(config, out_dir, data_root=data_root, val_images=val_images, val_annotations=val_annotations,
                    time_budget_minutes=time_budget, device=device, max_iter=iterations, progress=False)
    if summary["device"].startswith("cuda"):
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux: this process's resident peak
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {f"{kind}_{name}": float(summary.get(kind, {}).get(name, float("nan"))) for kind, name in REPORTED}
    return {"iterations": summary["iterations"], "train_seconds": summary["train_seconds"],
            "s_per_iter": summary["train_seconds"] / max(summary["iterations"], 1),
            "peak_mib": peak_mib, "device": summary["device"], **metrics}


def _child_main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    record = run_one(**spec["args"])
    Path(spec["result"]).write_text(json.dumps(record))


def _run_in_child(spec_path: Path, result_path: Path, log_path: Path, nice: int, cpus=None) -> dict:
    """Run one spec in a child process (niced, and pinned to ``cpus`` when given); returns its record."""
    command = [sys.executable, "-m", "minimrcnn.engine.ablate", str(spec_path)]

    def set_up_child():
        if nice:
            os.nice(nice)
        if cpus:
            os.sched_setaffinity(0, cpus)

    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=set_up_child if (nice or cpus) else None)
        code = process.wait()
    if code != 0 or not result_path.is_file():
        tail = log_path.read_text()[-2000:] if log_path.is_file() else ""
        raise RuntimeError(f"ablation run {spec_path.parent.name} failed (exit {code}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def _load_state(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"settings": settings, "runs": {}}
    state = json.loads(path.read_text())
    if state.get("settings") != settings:
        raise ValueError(f"{path}: holds runs made with other settings {state.get('settings')}; "
                         f"now {settings}. Use another --out, or delete it to start over")
    return state


def _write_json(path: Path, value) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)  # atomic: an interrupt never leaves half a file


def cpu_slots(jobs: int) -> list:
    """CPU sets of ``jobs`` parallel runs: this process's CPUs dealt out in equal blocks, or
    [None] (no pinning) for one job or when there are fewer CPUs than jobs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jobs == 1 or len(cpus) < jobs:
        return [None] * jobs
    share = len(cpus) // jobs
    return [set(cpus[i * share:(i + 1) * share]) for i in range(jobs)]


def first_val_images(data_root, limit: int, out_dir: Path) -> tuple[str, str]:
    """(image folder, annotation file) of the first ``limit`` val images (by id) of a shapes set:
    a cheaper evaluation for short proxy runs (an untrained model sends 100 detections per image
    through the mask head). Written once to OUT/instances_val_first<limit>.json."""
    from minimrcnn.engine.train import shapes_root

    root = shapes_root(data_root)
    path = out_dir / f"instances_val_first{limit}.json"
    if not path.is_file():
        full = json.loads((root / "annotations" / "instances_val.json").read_text())
        images = sorted(full["images"], key=lambda image: image["id"])[:limit]
        kept = {image["id"] for image in images}
        subset = {**full, "images": images, "annotations": [a for a in full["annotations"] if a["image_id"] in kept]}
        _write_json(path, subset)
    return str(root / "images"), str(path)


def ablate(out_dir, seeds: int = 3, only=None, iterations: int | None = None, time_budget: float | None = None,
           base_config: str = "shapes-cpu", data_root: str = "data/shapes", device: str | None = None,
           threads: int | None = None, nice: int = 0, val_limit: int | None = None, jobs: int = 1,
           progress=print) -> dict:
    """Run (or continue) the table; returns the state ({"settings", "runs"}) also kept in OUT/runs.json.

    ``val_limit``: evaluate every run on the first that many val images only (None: all).
    ``jobs``: runs at a time. With jobs > 1 each run is pinned to its own share of this
    process's CPUs (give ``threads`` = CPUs / jobs): two 1-thread runs on two cores keep
    their speed, two unpinned runs fight over both. Results do not depend on ``jobs`` with
    ``iterations``; with ``time_budget`` a run gets the iterations its share of CPU allows.
    """
    if (iterations is None) == (time_budget is None):
        raise ValueError("give exactly one of iterations (fixed count) and time_budget (minutes per run)")
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations: expected a positive count, got {iterations}")
    if seeds < 1:
        raise ValueError(f"seeds: expected at least 1, got {seeds}")
    names = list(ROWS) if not only else list(only)
    base = get_config(base_config)
    for name in names:
        row_changes(name, base)  # unknown names fail before anything runs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"base_config": base_config, "data_root": str(data_root), "iterations": iterations,
                "time_budget": time_budget, "val_limit": val_limit}
    state_path = out_dir / "runs.json"
    state = _load_state(state_path, settings)
    val_images, val_annotations = first_val_images(data_root, val_limit, out_dir) if val_limit else (None, None)
    if jobs < 1:
        raise ValueError(f"jobs: expected at least 1, got {jobs}")
    pending = []
    for seed in range(seeds):  # seed-major: a short interruption leaves every row with some seeds
        for name in names:
            key = f"{name}-s{seed}"
            if key in state["runs"]:
                continue
            run_dir = out_dir / "runs" / key
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in run_dir.iterdir():  # an interrupted run starts over
                if stale.is_file():
                    stale.unlink()
            config = dataclasses.replace(base, seed=seed, **row_changes(name, base))
            spec = {"args": {"config_dict": config.to_dict(), "out_dir": str(run_dir), "data_root": str(data_root),
                             "iterations": iterations, "time_budget": time_budget, "device": device,
                             "threads": threads, "val_images": val_images, "val_annotations": val_annotations},
                    "result": str(run_dir / "result.json")}
            (run_dir / "spec.json").write_text(json.dumps(spec))
            pending.append((key, name, seed, run_dir))

    def finished(key, name, seed, record):  # in this thread only: one writer of runs.json
        state["runs"][key] = {"row": name, "seed": seed, **record}
        _write_json(state_path, state)
        (out_dir / "table.md").write_text(format_table(state, names))
        progress(f"ablate: {key} segm AP {record['segm_AP']:.3f} in {record['train_seconds']:.0f} s")

    slots = cpu_slots(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        free = list(range(jobs))
        running = {}
        for key, name, seed, run_dir in pending:
            if len(running) == jobs:  # wait for a slot
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    slot, *done_run = running.pop(future)
                    free.append(slot)
                    finished(*done_run, future.result())
            slot = free.pop(0)
            progress(f"ablate: {key} ..." + (f" (CPUs {sorted(slots[slot])})" if slots[slot] else ""))
            future = pool.submit(_run_in_child, run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt",
                                 nice, slots[slot])
            running[future] = (slot, key, name, seed)
        for future in concurrent.futures.as_completed(list(running)):
            _, *done_run = running.pop(future)
            finished(*done_run, future.result())
    (out_dir / "table.md").write_text(format_table(state, names))
    return state


# ------------------------------------------------------------------ the table


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def direction_verdict(row: list[float], baseline: list[float], paper_delta: float | None) -> tuple[str, float]:
    """(verdict, t) for segm AP values (fractions) of a row and of the baseline; see the module docstring."""
    if len(row) < 2 or len(baseline) < 2:
        return "n/a (needs 2+ seeds)", float("nan")
    (m_row, s_row), (m_base, s_base) = mean_std(row), mean_std(baseline)
    se = math.sqrt(s_row**2 / len(row) + s_base**2 / len(baseline))
    delta = m_row - m_base
    t = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    if paper_delta is None:
        return ("differs" if abs(t) >= T_THRESHOLD else "no difference") + " (no paper value)", t
    if abs(paper_delta) < PAPER_NO_EFFECT:
        return ("yes (no difference)" if abs(t) < T_THRESHOLD else "no (a difference)"), t
    if abs(t) < T_THRESHOLD:
        return "not resolved", t
    return ("yes" if (delta > 0) == (paper_delta > 0) else "opposite"), t


def _cell(values, scale=100.0, digits=1) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_rows(state: dict, names=None) -> list[dict]:
    """One dict per row with its runs' values, for tables and plots (AP as fractions)."""
    names = names or list(ROWS)
    by_row: dict[str, list[dict]] = {}
    for run in state["runs"].values():
        by_row.setdefault(run["row"], []).append(run)
    rows = []
    for name in names:
        runs = sorted(by_row.get(name, []), key=lambda r: r["seed"])
        _, compared, paper, paper_base = ROWS[name]
        paper_delta = None if paper is None or name == "baseline" else paper[0] - paper_base[0]
        rows.append({"name": name, "runs": runs, "compared": compared, "paper": paper, "paper_baseline": paper_base,
                     "paper_delta": paper_delta})
    return rows


def format_table(state: dict, names=None) -> str:
    settings = state["settings"]
    budget = (f"{settings['iterations']} iterations per run" if settings["iterations"] is not None
              else f"{settings['time_budget']} minutes per run")
    if settings.get("val_limit"):
        budget += f", evaluated on the first {settings['val_limit']} val images"
    rows = table_rows(state, names)
    baseline = next((r for r in rows if r["name"] == "baseline"), None)
    base_ap = [run["segm_AP"] for run in baseline["runs"]] if baseline else []
    lines = [
        f"Config {settings['base_config']}, data {settings['data_root']}, {budget}; mean ± std over seeds "
        "(AP in %, COCO val of the data set).",
        "",
        "| row | seeds | segm AP | AP50 | AP75 | APs | bbox AP | iterations | s/iter | peak MiB "
        "| Δ segm AP vs baseline (t) | paper: comparison | paper mask AP/AP50/AP75 (Δ AP) | direction reproduces? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        runs = row["runs"]
        if not runs:
            lines.append(f"| {row['name']} | 0 | | | | | | | | | | {row['compared']} | | not run |")
            continue
        ap = [r["segm_AP"] for r in runs]
        cells = [_cell([r[f"{k}_{n}"] for r in runs]) for k, n in REPORTED]
        iterations = _cell([r["iterations"] for r in runs], 1.0, 0)
        s_iter = _cell([r["s_per_iter"] for r in runs], 1.0, 3)
        memory = _cell([r["peak_mib"] for r in runs], 1.0, 0)
        if row["name"] == "baseline" or not base_ap:
            delta, verdict = "", ""
        else:
            verdict, t = direction_verdict(ap, base_ap, row["paper_delta"])
            d = 100 * (mean_std(ap)[0] - mean_std(base_ap)[0])
            delta = f"{d:+.1f} ({t:+.1f})" if not math.isnan(t) else f"{d:+.1f}"
        paper = row["paper"]
        if paper is None:
            paper_cell = "—"
        else:
            values = "/".join("—" if v is None else f"{v}" for v in paper)
            paper_cell = values if row["paper_delta"] is None else f"{values} ({row['paper_delta']:+.1f})"
        lines.append(f"| {row['name']} | {len(runs)} | " + " | ".join(cells)
                     + f" | {iterations} | {s_iter} | {memory} | {delta} | {row['compared']} | {paper_cell} "
                     f"| {verdict} |")
    lines += ["", "Direction rule: d = mean(row) − mean(baseline) of segm AP, t = d / sqrt(s_row²/n_row + "
              "s_base²/n_base); paper effect ≥ 0.5 AP: \"yes\" if d has its sign and |t| ≥ 2, \"opposite\" if not "
              "and |t| ≥ 2, else \"not resolved\"; paper effect < 0.5 AP: \"yes (no difference)\" if |t| < 2."]
    return "\n".join(lines) + "\n"


def ablate_from_args(args) -> dict:
    """``python -m minimrcnn ablate ...`` (see ``minimrcnn/cli.py``)."""
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    state = ablate(args.out, seeds=args.seeds, only=only, iterations=args.iterations, time_budget=args.time_budget,
                   base_config=args.config, data_root=args.data, device=args.device, threads=args.threads,
                   nice=args.nice, val_limit=args.val_limit, jobs=args.jobs)
    print((Path(args.out) / "table.md").read_text())
    return state


if __name__ == "__main__":  # the child process of one run
    _child_main(sys.argv[1:])


__all__ = ["ROWS", "ablate", "ablate_from_args", "direction_verdict", "format_table", "mean_std", "row_changes",
           "cpu_slots", "run_one", "table_rows"]
