"""The main job (``make demo``): shapes data, training within a time budget, COCO AP, pictures.

Steps: generate the shapes set if it is absent; train ``shapes-cpu-panoptic``
(``shapes-gpu-panoptic`` when CUDA is present: Mask R-CNN with Panoptic FPN's semantic
branch, trained jointly) for as many iterations as the budget allows, the schedule
stretched to fit; COCO-evaluate on shapes val and print the AP table, fuse instances and
semantics and print the PQ table; write into the output folder

    predictions.png   six val images with predicted masks, boxes, classes and scores
    panoptic.png      three val images: instances, predicted panoptic map, true panoptic map
    per_class.txt     AP / AP50 / AP75 per class (bbox, segm), class-aware and class-agnostic
    per_class.json    the same, with the confusion matrix counts
    confusion_matrix.png  true class x predicted class at IoU >= 0.5, plus missed and background
    loss_curve.png    the six losses and their sum
    metrics.json      {"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...},
                       "panoptic": {"All" | "Things" | "Stuff": {pq, sq, rq, n}},
                       "train_seconds", "job_seconds", "device", "iterations", "config"}
    panoptic_predictions.json + panoptic_predictions/   COCO panoptic predictions of val

The budget covers the whole job, data generation and evaluation included: with the
default 8 minutes, ``make demo`` on a fresh clone (which first builds the virtual
environment, about a minute and a half) ends within 10 on a 2-core CPU.
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

JOB_BUDGET_MINUTES = 8.0  # the whole job; make's first venv build and slack fit under the 10-minute bar
PICTURES_RESERVE_SECONDS = 15.0  # loading the final model and drawing the two pictures
PER_CLASS_RESERVE_SECONDS = 10.0  # per-class AP and confusion matrix after the COCO evaluation
GRID_ROWS, GRID_COLUMNS = 2, 3
PANOPTIC_ROWS = 3  # images in panoptic.png
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
        prediction = {name: value.cpu() if torch.is_tensor(value) else value for name, value in prediction.items()}
        draw_instances(axes, image, prediction["boxes"], prediction["labels"], prediction["scores"],
                       prediction["masks"], class_names=class_names, score_thresh=score_thresh)
        kept = int((prediction["scores"] >= score_thresh).sum())
        axes.set_title(f"image {target['image_id']}: {kept} found, {len(target['labels'])} true", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_panoptic_grid(model, dataset, path, device, num_images: int = PANOPTIC_ROWS,
                       score_thresh: float = SCORE_THRESH) -> Path:
    """Rows of (instances, predicted panoptic map, true panoptic map) for the first images of
    ``dataset`` (a ``CocoPanoptic``), in one PNG."""
    from matplotlib.figure import Figure

    from minimrcnn.engine.panoptic_eval import dataset_category_map, to_dataset_categories
    from minimrcnn.evaluation import read_panoptic_png
    from minimrcnn.viz import draw_instances, draw_panoptic

    count = min(num_images, len(dataset))
    samples = [dataset[index] for index in range(count)]
    predictions = model.predict([image.to(device) for image, _ in samples])
    category_map = dataset_category_map(model.config.num_classes, dataset.category_ids, dataset.stuff_category_ids)
    figure = Figure(figsize=(9, 3.1 * count), dpi=100)
    axes_grid = figure.subplots(count, 3, squeeze=False)
    for row, ((image, target), prediction) in zip(axes_grid, zip(samples, predictions)):
        draw_instances(row[0], image, prediction["boxes"].cpu(), prediction["labels"].cpu(),
                       prediction["scores"].cpu(), prediction["masks"].cpu(), class_names=dataset.class_names,
                       score_thresh=score_thresh)
        draw_panoptic(row[1], prediction["panoptic_seg"].cpu(),
                      to_dataset_categories(prediction["segments_info"], category_map), dataset.panoptic_categories)
        truth = dataset.panoptic_of_image[target["image_id"]]
        draw_panoptic(row[2], read_panoptic_png(dataset.panoptic_dir / truth["file_name"]), truth["segments_info"],
                      dataset.panoptic_categories)
        for axes, caption in zip(row, ("instances", "predicted panoptic", "true panoptic")):
            axes.set_title(f"image {target['image_id']}: {caption}", fontsize=8)
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
    config = get_config("shapes-gpu-panoptic" if device.type == "cuda" else "shapes-cpu-panoptic")
    budget_minutes = args.time_budget if args.time_budget is not None else JOB_BUDGET_MINUTES
    spent_seconds = time.perf_counter() - job_start
    train_minutes = budget_minutes - (spent_seconds + PICTURES_RESERVE_SECONDS + PER_CLASS_RESERVE_SECONDS) / 60
    if train_minutes <= 0:
        raise ValueError(f"time_budget: {budget_minutes} minutes leave no time for training "
                         f"after {spent_seconds:.0f} s of data preparation")
    print(f"demo: {config.name} on {device}, {train_minutes:.2f} minutes for training and evaluation")

    out_dir = Path(args.out)
    summary = train(config, out_dir, data_root=root, time_budget_minutes=train_minutes, device=device)

    from minimrcnn.data import CocoInstances

    model, model_config = load_model(out_dir / "model_final.pth", device)
    val_dataset = CocoInstances(root / "images", root / "annotations/instances_val.json")
    draw_prediction_grid(model, val_dataset, class_names_of(out_dir / "model_final.pth", model_config.num_classes),
                         out_dir / "predictions.png", device)
    if config.semantic_head:
        from minimrcnn.engine.panoptic_eval import default_panoptic_paths, panoptic_dataset

        annotations = root / "annotations/instances_val.json"
        panoptic_val = panoptic_dataset(root / "images", annotations, *default_panoptic_paths(annotations))
        draw_panoptic_grid(model, panoptic_val, out_dir / "panoptic.png", device)
    summary["job_seconds"] = round(time.perf_counter() - job_start, 1)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    segm, bbox = summary["segm"], summary["bbox"]
    print(f"demo: {summary['iterations']} iterations in {summary['train_seconds']:.0f} s; "
          f"segm AP {segm['AP']:.3f} (AP50 {segm['AP50']:.3f}, AP75 {segm['AP75']:.3f}), "
          f"bbox AP {bbox['AP']:.3f}"
          + (f"; PQ {summary['panoptic']['All']['pq']:.3f} (things {summary['panoptic']['Things']['pq']:.3f}, "
             f"stuff {summary['panoptic']['Stuff']['pq']:.3f})" if "panoptic" in summary else "")
          + f"; whole job {summary['job_seconds']:.0f} s; results in {out_dir}/")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary
