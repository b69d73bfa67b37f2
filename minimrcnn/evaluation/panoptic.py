"""Panoptic Quality (Kirillov et al. 2019), computed exactly as the COCO panoptic API's ``pq_compute``.

PQ scores a panoptic segmentation per category c, summed over all images:

    PQ_c = sum_{(g, p) in TP_c} IoU(g, p) / (|TP_c| + |FP_c| / 2 + |FN_c| / 2)
         = SQ_c (mean IoU of the matches)  x  RQ_c (an F1 score of the matching)

The rules, per image (segment ids: 0 is void; ``void`` below means gt void pixels):

- A ground-truth segment g and a predicted segment p *match* when they share a category,
  g is not crowd, and  inter / (|p| + |g| - inter - |p on void|) > 0.5  (strictly). The
  prediction's pixels on void are left out of the union: nobody knows what is there.
  Since segments do not overlap, IoU > 0.5 makes a match unique (given JSON areas that
  agree with the PNG; otherwise every pair above 0.5 counts, as in ``pq_compute``).
- Unmatched non-crowd ground truth is a false negative; crowd ground truth never is.
- An unmatched prediction is a false positive unless more than half of it lies on void or on
  the crowd region of its own category; then it is ignored.
- Ground-truth areas |g| come from the JSON; predicted areas |p| are counted in the PNG.
- Categories with TP + FP + FN = 0 (absent from both sides) are left out of the means;
  All / Things / Stuff are plain means over the categories counted, ``n`` of them.

Like ``pq_compute``, when an image holds several crowd segments of one category only the last
listed one is used by the false-positive rule, and ground-truth PNG ids missing from the JSON
are skipped (neither void nor a segment). Unlike it, an empty mean gives 0.0 with n = 0
instead of dividing by zero, and malformed input it would half-accept is refused with a
message naming the file: a ground-truth segment of an unknown category, PNGs of different
sizes, a segment id listed twice or the id 0 (void) in ``segments_info``.

Shape shorthand: H, W image size; ids are int64 [H, W] segment-id maps.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from minimrcnn.evaluation.panoptic_io import VOID_ID, check_panoptic_json, load_panoptic_json, read_panoptic_png

OFFSET = 256 ** 3  # segment ids are < 2^24, so gt_id * OFFSET + pred_id identifies a pixel pair
MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORE_FRACTION = 0.5  # an unmatched prediction more than this much on void/crowd is not an FP


def matched_iou(intersection, pred_area, gt_area, pred_on_void) -> float:
    """IoU of a (gt, pred) pair with the prediction's void pixels left out of the union."""
    return intersection / (pred_area + gt_area - intersection - pred_on_void)


def is_match(iou) -> bool:
    """A same-category, non-crowd pair matches when its IoU is strictly above 0.5."""
    return iou > MATCH_IOU


def is_ignored_prediction(pred_area, pred_on_void, pred_on_same_crowd) -> bool:
    """An unmatched prediction is ignored (not an FP) when > half of it is on void or same-category crowd."""
    return (pred_on_void + pred_on_same_crowd) / pred_area > IGNORE_FRACTION


def count_pixel_pairs(gt_ids: np.ndarray, pred_ids: np.ndarray) -> dict:
    """Intersections of every (gt segment, pred segment) pair: {(gt_id, pred_id): pixels}.

    gt_ids, pred_ids: int [H, W]. Pairs with id 0 count pixels on void.
    """
    combined = gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64)  # [H, W], < 2^48
    labels, counts = np.unique(combined, return_counts=True)
    return {(int(label // OFFSET), int(label % OFFSET)): int(count) for label, count in zip(labels, counts)}


def _check_prediction(pred_ids, pred_segments, categories, where) -> dict:
    """Areas of the predicted segments, counted in the PNG: {segment id: pixels}.

    Raises for a PNG id missing from the JSON, a JSON segment missing from the PNG and an
    unknown category, as ``pq_compute`` does.
    """
    labels, counts = np.unique(pred_ids, return_counts=True)
    areas = {int(label): int(count) for label, count in zip(labels, counts) if label != VOID_ID}
    for segment_id in areas:
        if segment_id not in pred_segments:
            raise KeyError(f"{where}: segment id {segment_id} is in the PNG but not in the JSON segments_info")
        category_id = pred_segments[segment_id]["category_id"]
        if category_id not in categories:
            raise KeyError(f"{where}: segment id {segment_id} has unknown category_id {category_id}")
    missing = sorted(set(pred_segments) - set(areas))
    if missing:
        raise KeyError(f"{where}: segment ids {missing} are in the JSON segments_info but not in the PNG")
    return areas


def pq_stats_per_image(gt_ids: np.ndarray, gt_segments: list, pred_ids: np.ndarray, pred_segments: list,
                       categories: dict, where: str = "image") -> dict:
    """TP / FP / FN counts and IoU sums of one image, per category.

    gt_ids, pred_ids: int [H, W] segment-id maps (0 void). gt_segments, pred_segments: the
    images' ``segments_info`` lists (gt needs ``id``, ``category_id``, ``area``, ``iscrowd``; pred
    ``id``, ``category_id``). categories: {category id: category dict}. ``where`` names the
    image in error messages. Returns {category id: {"tp", "fp", "fn", "iou"}} for the
    categories that occur (``iou`` = sum of the matched IoUs).
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"{where}: the predicted PNG is {list(pred_ids.shape)}, "
                         f"the ground truth {list(gt_ids.shape)}")
    gt = {segment["id"]: segment for segment in gt_segments}
    pred = {segment["id"]: segment for segment in pred_segments}
    pred_area = _check_prediction(pred_ids, pred, categories, where)
    inter = count_pixel_pairs(gt_ids, pred_ids)
    stats = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})

    # 1. matches: same category, gt not crowd, IoU > 0.5
    gt_matched, pred_matched = set(), set()
    for (gt_id, pred_id), intersection in inter.items():
        if gt_id not in gt or pred_id not in pred:  # void on either side (or an unlisted gt id)
            continue
        g, p = gt[gt_id], pred[pred_id]
        if g["iscrowd"] == 1 or g["category_id"] != p["category_id"]:
            continue
        iou = matched_iou(intersection, pred_area[pred_id], g["area"], inter.get((VOID_ID, pred_id), 0))
        if is_match(iou):
            stats[g["category_id"]]["tp"] += 1
            stats[g["category_id"]]["iou"] += iou
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    # 2. false negatives: unmatched gt, crowd excepted (remember the crowd region per category)
    crowd_of_category = {}
    for gt_id, g in gt.items():
        if gt_id in gt_matched:
            continue
        if g["iscrowd"] == 1:
            crowd_of_category[g["category_id"]] = gt_id  # the last crowd listed, as pq_compute
            continue
        stats[g["category_id"]]["fn"] += 1

    # 3. false positives: unmatched predictions, unless mostly on void or same-category crowd
    for pred_id, p in pred.items():
        if pred_id in pred_matched:
            continue
        on_void = inter.get((VOID_ID, pred_id), 0)
        crowd_id = crowd_of_category.get(p["category_id"])
        on_crowd = inter.get((crowd_id, pred_id), 0) if crowd_id is not None else 0
        if is_ignored_prediction(pred_area[pred_id], on_void, on_crowd):
            continue
        stats[p["category_id"]]["fp"] += 1
    return dict(stats)


def pq_from_stats(stats: dict, categories: dict) -> dict:
    """Summed per-category counts -> the result of ``panoptic_quality`` (see there)."""
    per_class = {}
    for category_id in categories:
        s = stats.get(category_id, {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
        tp, fp, fn, iou = s["tp"], s["fp"], s["fn"], s["iou"]
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[category_id] = {"pq": iou / denominator if denominator else 0.0,
                                  "sq": iou / tp if tp else 0.0,
                                  "rq": tp / denominator if denominator else 0.0,
                                  "tp": tp, "fp": fp, "fn": fn}
    result = {}
    for name, wanted in (("All", None), ("Things", True), ("Stuff", False)):
        counted = [per_class[c] for c, info in categories.items()
                   if (wanted is None or (info["isthing"] == 1) == wanted)
                   and per_class[c]["tp"] + per_class[c]["fp"] + per_class[c]["fn"] > 0]
        n = len(counted)
        result[name] = {key: sum(c[key] for c in counted) / n if n else 0.0 for key in ("pq", "sq", "rq")}
        result[name]["n"] = n
    result["per_class"] = per_class
    return result


def _load(source, what, ground_truth):
    """(content, name for messages) of a JSON path or an already loaded dict."""
    if isinstance(source, dict):
        check_panoptic_json(source, what, ground_truth=ground_truth)
        return source, what
    return load_panoptic_json(source, ground_truth=ground_truth), str(source)


def panoptic_quality(gt_json, pred_json, gt_folder=None, pred_folder=None) -> dict:
    """PQ / SQ / RQ of predictions against ground truth, in the argument order of ``pq_compute``.

    gt_json, pred_json: paths of COCO panoptic JSONs (or their loaded dicts). gt_folder,
    pred_folder: folders of their PNGs (default: the JSON path without ``.json``, as
    ``pq_compute``). Images are paired by ``image_id``; every ground-truth image needs a
    prediction; predictions of other images are ignored. Categories come from the gt JSON.

    Returns {"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"},
             "per_class": {category id: {"pq", "sq", "rq", "tp", "fp", "fn"}}}, PQ/SQ/RQ as
    fractions in [0, 1]; ``n`` = categories counted (TP + FP + FN > 0). ``per_class`` lists
    every category of the gt JSON, zeros for those absent from both sides.
    """
    gt, gt_name = _load(gt_json, "the ground-truth JSON", ground_truth=True)
    pred, pred_name = _load(pred_json, "the prediction JSON", ground_truth=False)
    for source, folder, what in ((gt_json, gt_folder, "gt_folder"), (pred_json, pred_folder, "pred_folder")):
        if folder is None and isinstance(source, dict):
            raise ValueError(f"{what} is needed when its JSON is given as a dict")
    gt_folder = str(gt_json).replace(".json", "") if gt_folder is None else gt_folder
    pred_folder = str(pred_json).replace(".json", "") if pred_folder is None else pred_folder
    for folder, what in ((gt_folder, "ground-truth"), (pred_folder, "prediction")):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{what} PNG folder not found: {folder}")
    categories = {category["id"]: category for category in gt["categories"]}
    pred_by_image = {annotation["image_id"]: annotation for annotation in pred["annotations"]}

    totals = defaultdict(lambda: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0})
    for gt_annotation in gt["annotations"]:
        image_id = gt_annotation["image_id"]
        if image_id not in pred_by_image:
            raise KeyError(f"{pred_name}: no prediction for the image with id {image_id} "
                           f"(ground truth {gt_annotation['file_name']})")
        for segment in gt_annotation["segments_info"]:
            if segment["category_id"] not in categories:
                raise KeyError(f"{gt_name}: image {image_id} segment id {segment['id']} has unknown "
                               f"category_id {segment['category_id']}")
        pred_annotation = pred_by_image[image_id]
        pred_png = Path(pred_folder) / pred_annotation["file_name"]
        stats = pq_stats_per_image(read_panoptic_png(Path(gt_folder) / gt_annotation["file_name"]),
                                   gt_annotation["segments_info"], read_panoptic_png(pred_png),
                                   pred_annotation["segments_info"], categories,
                                   where=f"{pred_png} (image_id {image_id})")
        for category_id, s in stats.items():
            for key in ("tp", "fp", "fn", "iou"):
                totals[category_id][key] += s[key]
    return pq_from_stats(totals, categories)


def format_pq_table(result: dict, category_names: dict | None = None) -> str:
    """A text table of ``panoptic_quality``'s result: All / Things / Stuff, then per class (PQ in %).

    category_names: optional {category id: name}. Classes absent from both sides show "-".
    """
    names = category_names or {}
    lines = [f"{'':>12} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'n':>4}"]
    for group in ("All", "Things", "Stuff"):
        r = result[group]
        lines.append(f"{group:>12} {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} {r['n']:4d}")
    lines.append("")
    lines.append(f"{'class':>12} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'TP':>5} {'FP':>5} {'FN':>5}")
    for category_id, r in result["per_class"].items():
        name = str(names.get(category_id, category_id))[:12]
        if r["tp"] + r["fp"] + r["fn"] == 0:
            lines.append(f"{name:>12} {'-':>6} {'-':>6} {'-':>6} {0:5d} {0:5d} {0:5d}")
            continue
        lines.append(f"{name:>12} {100 * r['pq']:6.1f} {100 * r['sq']:6.1f} {100 * r['rq']:6.1f} "
                     f"{r['tp']:5d} {r['fp']:5d} {r['fn']:5d}")
    return "\n".join(lines)
