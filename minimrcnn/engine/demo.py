"""The main job (``make demo``): shapes data, training within a time budget, COCO AP, pictures.

Steps: generate the shapes set if it is absent; train ``shapes-cpu`` (``shapes-gpu`` when
CUDA is present) for as many iterations as the budget allows, the schedule stretched to
fit; COCO-evaluate on shapes val and print the AP table; write into the output folder

    predictions.png   six val images with predicted masks, boxes, classes and scores
    loss_curve.png    the five losses and their sum
    metrics.json      {"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...},
                       "train_seconds", "job_seconds", "device", "iterations", "config"}

The budget covers the whole job, data generation and evaluation included: with the
default 9 minutes the job ends within 10 on a 2-core CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from minimrcnn.config import get_config
from minimrcnn.engine.checkpoint import load_model
from minimrcnn.engine.predict import class_names_of
from minimrcnn.engine.device import resolve_device
from minimrcnn.engine.train import shapes_root, train

JOB_BUDGET_MINUTES = 9.0  # the whole job; a minute of slack under the 10-minute bar
PICTURES_RESERVE_SECONDS = 10.0  # loading the final model and drawing the grid
GRID_ROWS, GRID_COLUMNS = 2, 3
SCORE_THRESH = 0.5  # detections drawn in the grid


def draw_prediction_grid(model, dataset, class_names, path, device, num_images: int = GRID_ROWS * GRID_COLUMNS,
                         score_thresh: float = SCORE_THRESH) -> Path:
    """The first ``num_images`` images of ``dataset`` with the model's predictions, in one PNG."""
    from matplotlib.figure import Figure

    from minimrcnn.viz import draw_instances

    count = min(num_images, len(dataset))
    samples = [dataset[index] for index in range(count)]
    predictions = model.predict([image.to(device) for image, _ in samples])
    columns = min(GRID_COLUMNS, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(3 * columns, 3.1 * rows), dpi=100)
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes in axes_grid.flat:
        axes.set_axis_off()
    for axes, (image, target), prediction in zip(axes_grid.flat, samples, predictions):
        prediction = {name: value.cpu() for name, value in prediction.items()}
        draw_instances(axes, image, prediction["boxes"], prediction["labels"], prediction["scores"],
                       prediction["masks"], class_names=class_names, score_thresh=score_thresh)
        kept = int((prediction["scores"] >= score_thresh).sum())
        axes.set_title(f"image {target['image_id']}: {kept} found, {len(target['labels'])} true", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def run_demo(args) -> dict:
    """``python -m minimrcnn demo [--out runs/demo] [--data data/shapes] [--time-budget MINUTES]``."""
    job_start = time.perf_counter()
    device = resolve_device(args.device)
    root = shapes_root(args.data)
    config = get_config("shapes-gpu" if device.type == "cuda" else "shapes-cpu")
    budget_minutes = args.time_budget if args.time_budget is not None else JOB_BUDGET_MINUTES
    spent_seconds = time.perf_counter() - job_start
    train_minutes = budget_minutes - (spent_seconds + PICTURES_RESERVE_SECONDS) / 60
    if train_minutes <= 0:
        raise ValueError(f"time_budget: {budget_minutes} minutes leave no time for training "
                         f"after {spent_seconds:.0f} s of data preparation")
    print(f"demo: {config.name} on {device}, {train_minutes:.2f} minutes for training and evaluation")

    out_dir = Path(args.out)
    summary = train(config, out_dir, data_root=root, time_budget_minutes=train_minutes, device=device)

    from minimrcnn.data import CocoInstances

    model, _ = load_model(out_dir / "model_final.pth", device)
    val_dataset = CocoInstances(root / "images", root / "annotations/instances_val.json")
    draw_prediction_grid(model, val_dataset, class_names_of(out_dir / "model_final.pth", config.num_classes),
                         out_dir / "predictions.png", device)
    summary["job_seconds"] = round(time.perf_counter() - job_start, 1)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    segm, bbox = summary["segm"], summary["bbox"]
    print(f"demo: {summary['iterations']} iterations in {summary['train_seconds']:.0f} s; "
          f"segm AP {segm['AP']:.3f} (AP50 {segm['AP50']:.3f}, AP75 {segm['AP75']:.3f}), "
          f"bbox AP {bbox['AP']:.3f}; whole job {summary['job_seconds']:.0f} s; results in {out_dir}/")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary
