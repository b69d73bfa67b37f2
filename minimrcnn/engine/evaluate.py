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
                   print_table: bool = True) -> dict:
    """COCO bbox and segm AP of ``model`` on ``val_dataset``, each process predicting a shard.

    Returns ``{"bbox": {...}, "segm": {...}}`` (AP as fractions) on every process.
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
    return distrib.broadcast_object(metrics)


def evaluate_from_args(args) -> dict:
    """``python -m minimrcnn evaluate --checkpoint C --images DIR --annotations FILE [--out DIR]``."""
    from minimrcnn.data import CocoInstances

    device = resolve_device(args.device)
    model, _ = ckpt.load_model(args.checkpoint, device)
    dataset = CocoInstances(args.images, args.annotations)
    predictions = predict_dataset(model, dataset, device, progress=True)
    results = predictions_to_coco_results([p for _, p in predictions], [i for i, _ in predictions],
                                          getattr(dataset, "category_ids", None))
    metrics = evaluate_coco(args.annotations, results)
    print(format_ap_table(metrics))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "coco_results.json").write_text(json.dumps(results))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out / 'coco_results.json'} and {out / 'metrics.json'}")
    return metrics


__all__ = ["evaluate_from_args", "evaluate_model"]
