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


def evaluate_model(model, val_dataset, annotation_file, device, batch_size: int = 8,
                   print_table: bool = True, panoptic_out=None) -> dict:
    """COCO bbox and segm AP of ``model`` on ``val_dataset``, each process predicting a shard.

    Returns ``{"bbox": {...}, "segm": {...}}`` (AP as fractions) on every process. With
    ``panoptic_out`` (a folder; the model needs a semantic head and ``val_dataset`` must be a
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
    metrics = distrib.broadcast_object(metrics)
    if panoptic_out is not None:
        from minimrcnn.engine.panoptic_eval import evaluate_panoptic, panoptic_summary

        result = evaluate_panoptic(predictions, val_dataset, panoptic_out, model.config.num_classes, print_table)
        metrics = {**metrics, "panoptic": panoptic_summary(result)}
    return metrics


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
    predictions = predict_dataset(model, dataset, device, progress=True)
    results = predictions_to_coco_results([p for _, p in predictions], [i for i, _ in predictions],
                                          getattr(dataset, "category_ids", None))
    metrics = evaluate_coco(args.annotations, results)
    print(format_ap_table(metrics))
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


__all__ = ["evaluate_from_args", "evaluate_model"]
