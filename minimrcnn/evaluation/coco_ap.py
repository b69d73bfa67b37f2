"""COCO average precision, written to be read: the twelve numbers of pycocotools' summary.

The COCO benchmark scores instance detection and segmentation in four steps:

1. ``prepare``: group ground truth and results by (image, category); a result keeps
   at most ``MAX_DETECTIONS[-1]`` (100) of its highest-scoring detections per group.
2. ``evaluate_image``: for one (image, category) and one object-size range, match the
   detections, in score order, to ground truth at each IoU threshold 0.50:0.05:0.95.
   Crowd regions and objects outside the size range are *ignored*: a detection that
   lands on them is neither a true nor a false positive.
3. ``accumulate``: for each category, size range and detection budget (1, 10, 100 per
   image), sort all detections of all images by score, count true and false positives,
   and read the precision-recall curve -- made monotone -- at 101 recall points.
4. ``summarize``: average over categories (and IoU thresholds) into AP, AP50, AP75,
   APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.

pycocotools' own ``COCOeval`` is the judge: ``coco_ap`` reproduces its summary to
floating-point precision (the tests check it). Only the region primitives (RLE
encoding, mask area, IoU with crowd flags) come from ``pycocotools.mask``.

Shape shorthand:
    T: IoU thresholds (10)        R: recall points (101)
    K: categories                 A: area ranges (4)       M: detection budgets (3)
    D: detections of one group    G: ground-truth objects of one group
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

# linspace, not arange: arange drifts and 0.75 would not be exactly a threshold.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # [T]
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # [R]
MAX_DETECTIONS = (1, 10, 100)  # [M], per image and category
# Object sizes in pixels², both ends inclusive; 1e10 stands for "no upper bound".
AREA_RANGES = {
    "all": (0.0, 1e10),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e10),
}
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class Group:
    """Ground truth and detections of one (image, category).

    ``gt_regions`` / ``dt_regions`` are boxes ``[x, y, w, h]`` or RLE dicts, as the IoU
    type needs; detections are sorted by decreasing score (stable) and cut to 100.
    """

    gt_regions: list = field(default_factory=list)
    gt_areas: list = field(default_factory=list)  # [G], from the JSON "area" field
    gt_crowd: list = field(default_factory=list)  # [G], iscrowd flags
    dt_regions: list = field(default_factory=list)
    dt_areas: list = field(default_factory=list)  # [D]
    dt_scores: list = field(default_factory=list)  # [D]
    ious: np.ndarray | None = None  # [D, G], filled by prepare()


@dataclass
class ImageResult:
    """Outcome of matching one (image, category) in one area range.

    scores: [D] detection scores, highest first
    matched: [T, D] bool, the detection matched a ground-truth object at threshold t
    ignored: [T, D] bool, the detection counts neither as true nor false positive
    gt_ignored: [G] bool, ground truth that recall does not count (crowd, out of range)
    """

    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    gt_ignored: np.ndarray


@dataclass
class CocoEvaluation:
    """Everything ``evaluate`` computes; ``stats`` holds the twelve summary numbers."""

    category_ids: list  # [K]
    precision: np.ndarray  # [T, R, K, A, M], -1 where a category has no ground truth
    recall: np.ndarray  # [T, K, A, M], -1 likewise
    stats: np.ndarray  # [12], in SUMMARY_NAMES order
    image_results: dict  # (k, a) -> list of ImageResult, images in id order


# --------------------------------------------------------------------------- loading

def _load_json(source, name: str):
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{name}: cannot read COCO JSON from {path}: {error}") from error
    return source


def _to_rle(segmentation, height: int, width: int):
    """Polygons, uncompressed RLE or compressed RLE -> one compressed RLE dict."""
    if isinstance(segmentation, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        return segmentation
    raise TypeError(f"segmentation must be polygons or an RLE dict, got {type(segmentation).__name__}")


def _box_polygon(box):
    """The polygon of a box [x, y, w, h]: how pycocotools gives a box result a mask."""
    x1, y1, x2, y2 = box[0], box[1], box[0] + box[2], box[1] + box[3]
    return [[x1, y1, x1, y2, x2, y2, x2, y1]]


def _check_ground_truth(gt: dict) -> None:
    if not isinstance(gt, dict):
        raise TypeError(f"ground_truth must be a path or a dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground_truth has no {key!r} field")
    seen_ids = set()
    for ann in gt["annotations"]:
        # pycocotools stores the matched annotation id, so id 0 would read as "no match".
        annotation_id = ann.get("id")
        if annotation_id in (0, None) or annotation_id in seen_ids:
            raise ValueError("ground_truth annotation ids must be unique and non-zero, "
                             f"got {annotation_id!r}")
        seen_ids.add(annotation_id)


def prepare(ground_truth, results, iou_type: str = "segm"):
    """Step 1: group regions by (image, category) and compute their IoUs.

    Returns ``(image_ids, category_ids, groups)``: sorted ids and a dict
    ``(image_id, category_id) -> Group``. Results for categories that the ground truth
    does not list are dropped (as pycocotools does); results for unknown images are
    an error.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    gt = _load_json(ground_truth, "ground_truth")
    _check_ground_truth(gt)
    results = _load_json(results, "results")
    if not isinstance(results, list):
        raise TypeError(f"results must be a path or a list of dicts, got {type(results).__name__}")

    image_sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    image_ids = sorted(image_sizes)
    known_categories = {category["id"] for category in gt["categories"]}
    category_ids = sorted(known_categories)
    region_field = "segmentation" if iou_type == "segm" else "bbox"
    groups: dict = {}

    for ann in gt["annotations"]:
        key = (ann["image_id"], ann["category_id"])
        if ann["image_id"] not in image_sizes or ann["category_id"] not in known_categories:
            continue
        for required in (region_field, "area"):
            if required not in ann:
                raise ValueError(f"ground_truth annotation {ann['id']} has no {required!r}")
        group = groups.setdefault(key, Group())
        if iou_type == "segm":
            group.gt_regions.append(_to_rle(ann["segmentation"], *image_sizes[ann["image_id"]]))
        else:
            group.gt_regions.append(list(ann["bbox"]))
        group.gt_areas.append(ann["area"])
        group.gt_crowd.append(int(ann.get("iscrowd", 0)))

    for index, result in enumerate(results):
        if result.get("image_id") not in image_sizes:
            raise ValueError(f"results[{index}] refers to image_id {result.get('image_id')!r}, "
                             "which the ground truth does not have")
        if result["category_id"] not in known_categories:
            continue
        region, area = _result_region(result, index, iou_type, image_sizes[result["image_id"]])
        group = groups.setdefault((result["image_id"], result["category_id"]), Group())
        group.dt_regions.append(region)
        group.dt_areas.append(area)
        group.dt_scores.append(float(result["score"]))

    for group in groups.values():
        _sort_and_cut_detections(group)
        group.ious = compute_ious(group.dt_regions, group.gt_regions, group.gt_crowd)
    return image_ids, category_ids, groups


def _result_region(result: dict, index: int, iou_type: str, image_size: tuple):
    """A result's region for ``iou_type`` (box [x, y, w, h] or RLE) and its area.

    As pycocotools' ``loadRes``: the area is the box's ``w*h`` when the result has a
    box, else the mask's; a mask-only result gets its mask's bounding box, and a
    box-only result is evaluated in ``segm`` as the mask of its box.
    """
    has_box = len(result.get("bbox", [])) > 0
    has_mask = "segmentation" in result
    if not (has_box or has_mask):
        raise ValueError(f"results[{index}] has neither 'bbox' nor 'segmentation'")
    rle = _to_rle(result["segmentation"], *image_size) if has_mask else None
    area = result["bbox"][2] * result["bbox"][3] if has_box else float(mask_utils.area(rle))
    if iou_type == "bbox":
        region = list(result["bbox"]) if has_box else mask_utils.toBbox(rle).tolist()
    else:
        region = rle if has_mask else _to_rle(_box_polygon(result["bbox"]), *image_size)
    return region, area


def _sort_and_cut_detections(group: Group) -> None:
    """Highest score first; equal scores keep their input order (stable sort)."""
    order = np.argsort(-np.asarray(group.dt_scores, dtype=np.float64), kind="stable")
    # Cutting here only saves work: matching is greedy in score order, so the
    # detections beyond the budget could not change the matches of those before.
    order = order[:MAX_DETECTIONS[-1]]
    group.dt_regions = [group.dt_regions[i] for i in order]
    group.dt_areas = [group.dt_areas[i] for i in order]
    group.dt_scores = [group.dt_scores[i] for i in order]


def compute_ious(dt_regions: list, gt_regions: list, gt_crowd: list) -> np.ndarray:
    """IoU [D, G] of detections and ground truth (boxes or RLEs).

    For a crowd region the "IoU" is intersection / area(detection): how much of the
    detection lies inside the crowd, however large the crowd is.
    """
    if len(dt_regions) == 0 or len(gt_regions) == 0:
        return np.zeros((len(dt_regions), len(gt_regions)))
    return np.asarray(mask_utils.iou(dt_regions, gt_regions, gt_crowd), dtype=np.float64)


# ------------------------------------------------------------------- per image matching

def match_detections(ious: np.ndarray, gt_ignored: np.ndarray, gt_crowd: np.ndarray,
                     iou_threshold: float) -> np.ndarray:
    """Greedy matching at one threshold; returns the matched ground truth [D] (-1: none).

    ious: [D, G] with detections highest score first and ignored ground truth last.
    Each detection takes the still-free ground truth of highest IoU >= threshold; a
    regular object beats any ignored one, and a crowd region may absorb many detections.
    """
    num_detections, num_gt = ious.shape
    gt_taken = np.zeros(num_gt, dtype=bool)
    matched_gt = np.full(num_detections, -1)
    for d in range(num_detections):
        best_iou = iou_threshold
        best = -1
        for g in range(num_gt):
            if gt_taken[g] and not gt_crowd[g]:
                continue
            if best >= 0 and not gt_ignored[best] and gt_ignored[g]:
                break  # found a regular object; only ignored ones follow
            if ious[d, g] < best_iou:
                continue
            best_iou, best = ious[d, g], g  # ">=": of equal IoUs the later object wins
        if best >= 0:
            gt_taken[best] = True
            matched_gt[d] = best
    return matched_gt


def evaluate_image(group: Group, area_range: tuple) -> ImageResult:
    """Step 2: match one (image, category) at every IoU threshold, for one area range.

    Ground truth is ignored if it is a crowd or its area is outside the range. A
    detection matched to ignored ground truth is ignored; so is an unmatched detection
    whose own area is outside the range (it may be a fine detection of an object that
    this range does not count).
    """
    low, high = area_range
    gt_areas = np.asarray(group.gt_areas, dtype=np.float64)
    gt_crowd = np.asarray(group.gt_crowd, dtype=bool)
    gt_ignored = gt_crowd | (gt_areas < low) | (gt_areas > high)  # [G]
    gt_order = np.argsort(gt_ignored, kind="stable")  # regular objects first
    gt_ignored, gt_crowd = gt_ignored[gt_order], gt_crowd[gt_order]
    ious = group.ious[:, gt_order]  # [D, G]

    dt_areas = np.asarray(group.dt_areas, dtype=np.float64)
    dt_out_of_range = (dt_areas < low) | (dt_areas > high)  # [D]
    num_detections = len(group.dt_scores)
    matched = np.zeros((len(IOU_THRESHOLDS), num_detections), dtype=bool)  # [T, D]
    ignored = np.zeros_like(matched)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        matched_gt = match_detections(ious, gt_ignored, gt_crowd, threshold)
        matched[t] = matched_gt >= 0
        ignored[t] = dt_out_of_range & ~matched[t]
        ignored[t, matched[t]] = gt_ignored[matched_gt[matched[t]]]
    return ImageResult(np.asarray(group.dt_scores, dtype=np.float64), matched, ignored, gt_ignored)


# ------------------------------------------------------------------------ accumulation

def gather_detections(image_results: list, max_detections: int):
    """Pool the top ``max_detections`` of every image, all images sorted by score.

    Returns ``(true_positive [T, N], false_positive [T, N], num_gt)`` over the N pooled
    detections (an ignored one is neither) and num_gt, the ground truth recall counts.
    """
    if not image_results:
        empty = np.zeros((len(IOU_THRESHOLDS), 0), dtype=bool)
        return empty, empty, 0
    scores = np.concatenate([r.scores[:max_detections] for r in image_results])
    matched = np.concatenate([r.matched[:, :max_detections] for r in image_results], axis=1)
    ignored = np.concatenate([r.ignored[:, :max_detections] for r in image_results], axis=1)
    num_gt = int(sum(np.count_nonzero(~r.gt_ignored) for r in image_results))
    order = np.argsort(-scores, kind="stable")  # ties: earlier image first
    matched, ignored = matched[:, order], ignored[:, order]
    return matched & ~ignored, ~matched & ~ignored, num_gt


def precision_recall_curve(true_positive: np.ndarray, false_positive: np.ndarray, num_gt: int):
    """Raw curve of one threshold: recall [N] and precision [N] after each detection."""
    tp_sum = np.cumsum(true_positive).astype(np.float64)
    fp_sum = np.cumsum(false_positive).astype(np.float64)
    recall = tp_sum / num_gt
    precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
    return recall, precision


def interpolate_precision(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Precision [R] at the 101 recall points, after making the curve monotone.

    Each point takes the best precision reachable at that recall or beyond (the
    running maximum from the right), read at the first detection whose recall reaches
    the point; recall points the detections never reach get precision 0.
    """
    monotone = np.maximum.accumulate(precision[::-1])[::-1]
    positions = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")  # [R]
    reached = positions < len(recall)
    sampled = np.zeros(len(RECALL_THRESHOLDS))
    sampled[reached] = monotone[positions[reached]]
    return sampled


def accumulate(image_results: dict, num_categories: int):
    """Step 3: precision [T, R, K, A, M] and recall [T, K, A, M] from the matches.

    ``image_results[(k, a)]`` lists the ImageResults of category k in area range a.
    Entries stay -1 where a category has no counted ground truth.
    """
    num_t, num_r = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    num_a, num_m = len(AREA_RANGES), len(MAX_DETECTIONS)
    precision = -np.ones((num_t, num_r, num_categories, num_a, num_m))
    recall = -np.ones((num_t, num_categories, num_a, num_m))
    for (k, a), results in image_results.items():
        for m, max_detections in enumerate(MAX_DETECTIONS):
            true_positive, false_positive, num_gt = gather_detections(results, max_detections)
            if num_gt == 0:
                continue
            for t in range(num_t):
                rc, pr = precision_recall_curve(true_positive[t], false_positive[t], num_gt)
                recall[t, k, a, m] = rc[-1] if len(rc) else 0.0
                precision[t, :, k, a, m] = interpolate_precision(rc, pr)
    return precision, recall


# ------------------------------------------------------------------------ summary

def _mean_present(values: np.ndarray) -> float:
    present = values[values > -1]
    return float(np.mean(present)) if present.size else -1.0


def summarize(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Step 4: the twelve numbers, means over the entries that are not -1."""
    area_index = {name: i for i, name in enumerate(AREA_RANGES)}
    last_m = len(MAX_DETECTIONS) - 1

    def average_precision(iou=None, area="all"):
        values = precision[..., area_index[area], last_m]  # [T, R, K]
        if iou is not None:
            values = values[np.isclose(IOU_THRESHOLDS, iou)]
        return _mean_present(values)

    def average_recall(area="all", m=last_m):
        return _mean_present(recall[:, :, area_index[area], m])

    return np.array([
        average_precision(), average_precision(iou=0.5), average_precision(iou=0.75),
        average_precision(area="small"), average_precision(area="medium"),
        average_precision(area="large"),
        average_recall(m=0), average_recall(m=1), average_recall(m=2),
        average_recall("small"), average_recall("medium"), average_recall("large"),
    ])


def evaluate(ground_truth, results, iou_type: str = "segm") -> CocoEvaluation:
    """Run the four steps and keep every intermediate array."""
    image_ids, category_ids, groups = prepare(ground_truth, results, iou_type)
    image_results = {}
    for k, category_id in enumerate(category_ids):
        for a, area_range in enumerate(AREA_RANGES.values()):
            image_results[k, a] = [evaluate_image(groups[image_id, category_id], area_range)
                                   for image_id in image_ids if (image_id, category_id) in groups]
    precision, recall = accumulate(image_results, len(category_ids))
    return CocoEvaluation(category_ids, precision, recall, summarize(precision, recall), image_results)


def coco_ap(ground_truth, results, iou_type: str = "segm") -> np.ndarray:
    """The twelve COCO summary numbers [12] (SUMMARY_NAMES order), as pycocotools gives them.

    ground_truth: a COCO annotation file path or its dict.
    results: a COCO results file path or a list of dicts with image_id, category_id,
        score and a ``bbox`` [x, y, w, h] and/or a ``segmentation`` RLE.
    """
    return evaluate(ground_truth, results, iou_type).stats


def precision_recall(evaluation: CocoEvaluation, iou_threshold: float = 0.5, category_id=None,
                     area: str = "all", max_detections: int = 100):
    """Interpolated precision [R] at RECALL_THRESHOLDS, for drawing a PR curve.

    With ``category_id=None`` the curve is the mean over categories that have ground
    truth (the curve whose area is the AP at this threshold). Returns
    ``(RECALL_THRESHOLDS, precision)``.
    """
    t = _index_of(np.isclose(IOU_THRESHOLDS, iou_threshold), f"iou_threshold {iou_threshold}")
    a = _index_of(np.array([name == area for name in AREA_RANGES]), f"area {area!r}")
    m = _index_of(np.array(MAX_DETECTIONS) == max_detections, f"max_detections {max_detections}")
    curves = evaluation.precision[t, :, :, a, m]  # [R, K]
    if category_id is not None:
        k = _index_of(np.array(evaluation.category_ids) == category_id, f"category_id {category_id}")
        return RECALL_THRESHOLDS, curves[:, k]
    present = curves[0] > -1
    mean = curves[:, present].mean(axis=1) if present.any() else -np.ones(len(RECALL_THRESHOLDS))
    return RECALL_THRESHOLDS, mean


def raw_precision_recall(evaluation: CocoEvaluation, category_id, iou_threshold: float = 0.5,
                         area: str = "all", max_detections: int = 100):
    """The un-interpolated curve of one category: ``(recall [N], precision [N])``."""
    t = _index_of(np.isclose(IOU_THRESHOLDS, iou_threshold), f"iou_threshold {iou_threshold}")
    a = _index_of(np.array([name == area for name in AREA_RANGES]), f"area {area!r}")
    k = _index_of(np.array(evaluation.category_ids) == category_id, f"category_id {category_id}")
    true_positive, false_positive, num_gt = gather_detections(
        evaluation.image_results[k, a], max_detections)
    if num_gt == 0:
        raise ValueError(f"category_id {category_id} has no ground truth in area {area!r}")
    return precision_recall_curve(true_positive[t], false_positive[t], num_gt)


def _index_of(mask: np.ndarray, what: str) -> int:
    hits = np.flatnonzero(mask)
    if hits.size != 1:
        raise ValueError(f"{what} is not one of the evaluated settings")
    return int(hits[0])
