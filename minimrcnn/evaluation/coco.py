"""COCO evaluation with pycocotools, the benchmark's own judge.

``predictions_to_coco_results`` turns model outputs into the COCO results format
(boxes as ``[x, y, w, h]``, masks as compressed RLE), ``evaluate_coco`` runs
``COCOeval`` for boxes and masks, ``format_ap_table`` prints the usual table, and
``evaluate_from_args`` is ``python -m minimrcnn evaluate``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The first six of COCOeval's twelve summary numbers, in its order.
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def _to_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, maybe on the GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def encode_masks(masks) -> list[dict]:
    """Masks [D, H, W] (bool or 0/1) -> D compressed RLE dicts with ``counts`` as str (JSON-ready)."""
    masks = _to_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [D, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants column-major uint8 [H, W, D].
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predictions_to_coco_results(predictions, image_ids, category_ids=None) -> list[dict]:
    """Model outputs -> a COCO results list (one dict per detection).

    predictions: per image, a dict with boxes [D, 4] xyxy, labels [D] (1..K), scores [D]
        and optionally masks [D, H, W] bool, as ``MaskRCNN.predict`` returns.
    image_ids: the COCO image id of each prediction.
    category_ids: maps a label to its COCO category id as ``category_ids[label]`` (a
        dict, or a sequence whose entry 0 stands for the background); ``None`` when
        labels already are the category ids.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"predictions ({len(predictions)}) and image_ids ({len(image_ids)}) "
                         "must have the same length")
    results = []
    for prediction, image_id in zip(predictions, image_ids):
        boxes = _to_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)  # [D, 4]
        labels = _to_numpy(prediction["labels"]).reshape(-1)
        scores = _to_numpy(prediction["scores"]).astype(np.float64).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"image {image_id}: boxes, labels and scores differ in length")
        rles = encode_masks(prediction["masks"]) if "masks" in prediction else None
        for d, ((x1, y1, x2, y2), label, score) in enumerate(zip(boxes, labels, scores)):
            result = {"image_id": int(image_id), "category_id": _category_id(category_ids, int(label)),
                      "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                      "score": float(score)}
            if rles is not None:
                result["segmentation"] = rles[d]
            results.append(result)
    return results


def _category_id(category_ids, label: int) -> int:
    if category_ids is None:
        return label
    try:
        return int(category_ids[label])
    except (IndexError, KeyError) as error:
        raise ValueError(f"label {label} has no entry in category_ids") from error


def _load_ground_truth(ground_truth) -> COCO:
    if isinstance(ground_truth, COCO):
        return ground_truth
    coco = COCO()
    if isinstance(ground_truth, (str, Path)):
        try:
            coco.dataset = json.loads(Path(ground_truth).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"ground_truth: cannot read COCO JSON {ground_truth}: {error}") from error
    elif isinstance(ground_truth, dict):
        coco.dataset = copy.deepcopy(ground_truth)
    else:
        raise TypeError(f"ground_truth must be a path, a dict or a COCO object, "
                        f"got {type(ground_truth).__name__}")
    coco.createIndex()
    return coco


def evaluate_coco(ground_truth, results, iou_types=IOU_TYPES, verbose: bool = False) -> dict:
    """COCOeval's AP, AP50, AP75, APs, APm, APl as fractions, per IoU type.

    ground_truth: a COCO annotation file path, its dict, or a ``pycocotools.coco.COCO``.
    results: a COCO results list (see ``predictions_to_coco_results``) or a JSON file path.
    Returns ``{"bbox": {"AP": ..., ...}, "segm": {...}}``; a size range without ground
    truth reads -1, as in pycocotools. No results at all give zeros. ``verbose`` lets
    pycocotools print its progress and summary.
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_types: expected 'bbox' or 'segm', got {iou_type!r}")
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    metrics = {}
    with quiet:
        coco_gt = _load_ground_truth(ground_truth)
        unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
        if unknown:
            raise ValueError(f"results refer to image ids the ground truth lacks: {sorted(unknown)[:10]}")
        for iou_type in iou_types:
            if len(results) == 0:  # loadRes cannot take an empty list
                metrics[iou_type] = {name: 0.0 for name in AP_NAMES}
                continue
            # loadRes writes ids and areas into the dicts it gets: give it copies.
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            metrics[iou_type] = {name: float(value) for name, value in zip(AP_NAMES, evaluator.stats)}
    return metrics


def format_ap_table(metrics: dict) -> str:
    """A small text table of AP, AP50, AP75, APs, APm, APl (in %) per IoU type."""
    lines = ["COCO AP (%)   " + "".join(f"{name:>7}" for name in AP_NAMES)]
    for iou_type, values in metrics.items():
        cells = "".join(f"{100 * values[name]:7.1f}" if values[name] > -1 else f"{'-':>7}"
                        for name in AP_NAMES)
        lines.append(f"{iou_type:<14}{cells}")
    return "\n".join(lines)


def evaluate_from_args(args) -> dict:
    """``python -m minimrcnn evaluate --checkpoint C --images DIR --annotations FILE [--out DIR]``."""
    from minimrcnn.data import CocoInstances
    from minimrcnn.engine.checkpoint import load_checkpoint, load_model
    from minimrcnn.engine.train import resolve_device
    from minimrcnn.evaluation.inference import predict_dataset

    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    dataset = CocoInstances(args.images, args.annotations)
    predictions = predict_dataset(model, dataset, device, progress=True)
    # The model's own label -> category id table when its checkpoint has one (a converted
    # torchvision COCO model's labels are the category ids themselves), else the dataset's.
    category_ids = load_checkpoint(args.checkpoint).get("extra", {}).get("category_ids") \
        or getattr(dataset, "category_ids", None)
    results = predictions_to_coco_results([p for _, p in predictions], [i for i, _ in predictions],
                                          category_ids)
    metrics = evaluate_coco(args.annotations, results)
    print(format_ap_table(metrics))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "coco_results.json").write_text(json.dumps(results))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out / 'coco_results.json'} and {out / 'metrics.json'}")
    return metrics
