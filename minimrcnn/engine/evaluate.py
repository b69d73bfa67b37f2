"""COCO-evaluating a model: after training (``evaluate_model``) and from a checkpoint
(``evaluate_from_args``, i.e. ``python -m minimrcnn evaluate``).

The metrics themselves live in ``minimrcnn.evaluation`` (numpy and pycocotools only);
this module runs the model, which is why it belongs to the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minimrcnn.engine import checkpoint as ckpt
from minimrcnn.engine import distributed as distrib
from minimrcnn.engine.device import resolve_device
from minimrcnn.engine.inference import predict_dataset
from minimrcnn.evaluation.coco import evaluate_coco, format_ap_table, predictions_to_coco_results
from minimrcnn.evaluation.per_class import (CONFUSION_SCORE_THRESH, class_agnostic_ap, confusion_matrix,
                                            format_per_class_table, per_category_ap)


def per_class_report(annotation_file, results, metrics: dict, class_names: dict, out_dir=None,
                     print_table: bool = True) -> dict:
    """Per-class AP (bbox and segm), class-agnostic AP and the segm confusion matrix.

    class_names: ``{category_id: name}``. Prints the table; with ``out_dir`` writes
    ``per_class.json``, ``per_class.txt`` and ``confusion_matrix.png``. Returns the JSON's dict.
    """
    ground_truth = json.loads(Path(annotation_file).read_text())
    per_class = {t: per_category_ap(ground_truth, results, t) for t in metrics}
    agnostic = {t: class_agnostic_ap(ground_truth, results, t) for t in metrics}
    matrix, category_ids = confusion_matrix(ground_truth, results, "segm" if "segm" in metrics else "bbox")
    table = format_per_class_table(per_class, agnostic, metrics, class_names)
    report = {"per_class": {t: {str(class_names.get(c, c)): v for c, v in values.items()}
                            for t, values in per_class.items()},
              "class_agnostic": agnostic,
              "confusion_matrix": {"rows": [class_names.get(c, str(c)) for c in category_ids] + ["background"],
                                   "columns": [class_names.get(c, str(c)) for c in category_ids] + ["missed"],
                                   "counts": matrix.tolist(), "score_thresh": CONFUSION_SCORE_THRESH}}
    if print_table:
        print(table)
    if out_dir is not None:
        from matplotlib.figure import Figure

        from minimrcnn.viz import draw_confusion_matrix

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "per_class.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "per_class.txt").write_text(table + "\n")
        size = 1.5 + 0.6 * (len(category_ids) + 1)
        figure = Figure(figsize=(size + 1, size), dpi=100)
        draw_confusion_matrix(figure.add_subplot(), matrix, [class_names.get(c, str(c)) for c in category_ids],
                              title=f"IoU >= 0.5 regardless of class, score >= {CONFUSION_SCORE_THRESH}")
        figure.tight_layout()
        figure.savefig(out_dir / "confusion_matrix.png")
    return report


def evaluate_model(model, val_dataset, annotation_file, device, batch_size: int = 8,
                   print_table: bool = True, report_dir=None, panoptic_out=None) -> dict:
    """COCO bbox and segm AP of ``model`` on ``val_dataset``, each process predicting a shard.

    Returns ``{"bbox": {...}, "segm": {...}}`` (AP as fractions) on every process. With
    ``report_dir`` the per-class report (``per_class_report``) is printed and written there.
    With ``panoptic_out`` (a folder; the model needs a semantic head and ``val_dataset`` must be a
    ``CocoPanoptic``) the same predictions are also written as COCO panoptic files there and
    scored: ``"panoptic": {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}}`` is added.
    """
    info = distrib.get_info()
    model = ckpt.unwrap_model(model).eval()
    shard = torch.utils.data.Subset(val_dataset, distrib.shard_indices(len(val_dataset), info.rank,
                                                                       info.world_size))
    predictions = predict_dataset(model, shard, device, batch_size)
    image_ids = [image_id for image_id, _ in predictions]
    results = predictions_to_coco_results([p for _, p in predictions], image_ids,
                                          getattr(val_dataset, "category_ids", None))
    gathered = distrib.all_gather_objects(results)
    metrics = None
    if info.is_main:
        all_results = [r for part in gathered for r in part]
        metrics = evaluate_coco(str(annotation_file), all_results)
        if print_table:
            print(format_ap_table(metrics))
        if report_dir is not None:
            per_class_report(annotation_file, all_results, metrics, _names_of(val_dataset), report_dir,
                             print_table)
    metrics = distrib.broadcast_object(metrics)
    if panoptic_out is not None:
        from minimrcnn.engine.panoptic_eval import evaluate_panoptic, panoptic_summary

        result = evaluate_panoptic(predictions, val_dataset, panoptic_out, model.config.num_classes, print_table)
        metrics = {**metrics, "panoptic": panoptic_summary(result)}
    return metrics


def _names_of(dataset) -> dict:
    from minimrcnn.engine.classes import categories_of

    return categories_of(dataset) if hasattr(dataset, "category_ids") else {}


def check_checkpoint_categories(checkpoint_path, dataset) -> None:
    """The model's labels mean the categories it was trained on: the dataset must list the same."""
    from minimrcnn.engine.classes import categories_of, check_same_categories

    extra = ckpt.load_checkpoint(checkpoint_path).get("extra", {})
    if extra.get("category_ids") and extra.get("class_names"):
        trained = dict(zip(extra["category_ids"][1:], extra["class_names"][1:]))
        check_same_categories(trained, categories_of(dataset), f"checkpoint {checkpoint_path}",
                              f"annotations {dataset.annotation_file}")


def evaluate_from_args(args) -> dict:
    """``python -m minimrcnn evaluate --checkpoint C --images DIR --annotations FILE [--out DIR]``.

    A model with a semantic head is also scored on panoptic ground truth
    (``--panoptic-annotations FILE --panoptic-images DIR``, by default the panoptic files
    beside the instances JSON, see ``default_panoptic_paths``): its predictions are written
    as COCO panoptic PNG + JSON (into ``--out``, else a temporary folder) and the PQ table printed.
    """
    from minimrcnn.data import CocoInstances

    device = resolve_device(args.device)
    model, config = ckpt.load_model(args.checkpoint, device)
    if config.semantic_head:
        from minimrcnn.engine.panoptic_eval import default_panoptic_paths, panoptic_dataset

        default_json, default_folder = default_panoptic_paths(args.annotations)
        dataset = panoptic_dataset(args.images, args.annotations,
                                   getattr(args, "panoptic_annotations", None) or default_json,
                                   getattr(args, "panoptic_images", None) or default_folder, config)
    else:
        dataset = CocoInstances(args.images, args.annotations)
    dataset.check_image_files()
    check_checkpoint_categories(args.checkpoint, dataset)
    predictions = predict_dataset(model, dataset, device, progress=True)
    # The model's own label -> category id table when its checkpoint has one (a converted
    # torchvision COCO model's labels are the category ids themselves), else the dataset's.
    category_ids = ckpt.load_checkpoint(args.checkpoint).get("extra", {}).get("category_ids") \
        or getattr(dataset, "category_ids", None)
    results = predictions_to_coco_results([p for _, p in predictions], [i for i, _ in predictions],
                                          category_ids)
    metrics = evaluate_coco(args.annotations, results)
    print(format_ap_table(metrics))
    per_class_report(args.annotations, results, metrics, _names_of(dataset), args.out)
    if config.semantic_head:
        import tempfile

        from minimrcnn.engine.panoptic_eval import evaluate_panoptic, panoptic_summary

        with tempfile.TemporaryDirectory() as scratch:
            result = evaluate_panoptic(predictions, dataset, args.out or scratch, config.num_classes)
        metrics["panoptic"] = panoptic_summary(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "coco_results.json").write_text(json.dumps(results))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out / 'coco_results.json'} and {out / 'metrics.json'}")
    return metrics


__all__ = ["check_checkpoint_categories", "evaluate_from_args", "evaluate_model", "per_class_report"]
