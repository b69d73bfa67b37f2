"""Per-category AP, class-agnostic AP and a confusion matrix, from COCO's own matching.

``per_category_ap`` reads AP, AP50 and AP75 of each category off the precision array
that ``coco_ap`` builds (area "all", 100 detections), the very numbers pycocotools keeps
in ``COCOeval.eval["precision"][:, :, k, 0, 2]``. ``class_agnostic_ap`` scores the same
results with every category merged into one: the gap to the class-aware AP is what
classification costs. ``confusion_matrix`` matches detections to ground truth at IoU >= 0.5
regardless of class, with COCO's greedy matching (``coco_ap.match_detections``): rows are
the true classes plus a last "background" row (detections that match nothing), columns the
predicted classes plus a last "missed" column (ground truth no detection matched).

Shape shorthand: K categories.
"""

from __future__ import annotations

import numpy as np

from minimrcnn.evaluation.coco_ap import (AREA_RANGES, IOU_THRESHOLDS, MAX_DETECTIONS, _load_json,
                                          _result_region, _to_rle, accumulate, coco_ap, compute_ious,
                                          evaluate_image, match_detections, prepare)

PER_CLASS_NAMES = ("AP", "AP50", "AP75")
CONFUSION_SCORE_THRESH = 0.5  # detections counted in the confusion matrix (those a picture shows)
AGNOSTIC_ID = 1


def _mean_present(values: np.ndarray) -> float:
    present = values[values > -1]
    return float(present.mean()) if present.size else -1.0


def per_category_ap(ground_truth, results, iou_type: str = "segm") -> dict:
    """``{category_id: {"AP", "AP50", "AP75"}}`` as fractions; -1 for a category without ground truth."""
    image_ids, category_ids, groups = prepare(ground_truth, results, iou_type)
    all_area = AREA_RANGES["all"]
    image_results = {(k, 0): [evaluate_image(groups[image_id, category_id], all_area)
                              for image_id in image_ids if (image_id, category_id) in groups]
                     for k, category_id in enumerate(category_ids)}
    precision, _ = accumulate(image_results, len(category_ids))  # [T, R, K, A, M]
    m = MAX_DETECTIONS.index(100)
    table = {}
    for k, category_id in enumerate(category_ids):
        curves = precision[:, :, k, 0, m]  # [T, R]
        table[category_id] = {"AP": _mean_present(curves),
                              "AP50": _mean_present(curves[np.isclose(IOU_THRESHOLDS, 0.5)]),
                              "AP75": _mean_present(curves[np.isclose(IOU_THRESHOLDS, 0.75)])}
    return table


def merge_categories(ground_truth, results) -> tuple[dict, list]:
    """Ground truth and results with every category replaced by one (``AGNOSTIC_ID``)."""
    gt = _load_json(ground_truth, "ground_truth")
    results = _load_json(results, "results")
    known = {c["id"] for c in gt["categories"]}
    merged_gt = {**gt, "categories": [{"id": AGNOSTIC_ID, "name": "object"}],
                 "annotations": [{**a, "category_id": AGNOSTIC_ID} for a in gt["annotations"]
                                 if a["category_id"] in known]}
    merged_results = [{**r, "category_id": AGNOSTIC_ID} for r in results if r["category_id"] in known]
    return merged_gt, merged_results


def class_agnostic_ap(ground_truth, results, iou_type: str = "segm") -> dict:
    """``{"AP", "AP50", "AP75"}`` with classes ignored (pycocotools' ``useCats=0``)."""
    stats = coco_ap(*merge_categories(ground_truth, results), iou_type=iou_type)
    return dict(zip(PER_CLASS_NAMES, (float(v) for v in stats[:3])))


def image_overlaps(ground_truth, results, iou_type: str = "segm",
                   score_thresh: float = CONFUSION_SCORE_THRESH):
    """Per image, the IoUs of its kept detections with all its ground truth, whatever the class.

    Yields ``(image_id, anns, dets, crowd, ious)`` for every image that has ground truth or a
    detection with score >= ``score_thresh``, in image id order: ``anns`` the image's ground truth
    (of known categories, crowds last), ``dets`` a list of ``(index into results, result)``, highest
    score first (the 100 best), ``crowd`` [G] bool, ``ious`` [D, G] (for a crowd region,
    intersection over the detection's area, as COCO). The shared first step of
    ``confusion_matrix`` and ``evaluation.failures.classify_failures``.
    """
    gt = _load_json(ground_truth, "ground_truth")
    results = _load_json(results, "results")
    known = {c["id"] for c in gt["categories"]}
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    gt_of_image: dict = {}
    for ann in gt["annotations"]:
        if ann["category_id"] in known and ann["image_id"] in sizes:
            gt_of_image.setdefault(ann["image_id"], []).append(ann)
    dt_of_image: dict = {}
    for index, result in enumerate(results):
        if result["category_id"] in known and result["score"] >= score_thresh:
            dt_of_image.setdefault(result["image_id"], []).append((index, result))

    for image_id in sorted(set(gt_of_image) | set(dt_of_image)):
        if image_id not in sizes:
            raise ValueError(f"results refer to image_id {image_id}, which the ground truth does not have")
        anns = sorted(gt_of_image.get(image_id, []), key=lambda a: int(a.get("iscrowd", 0)))  # crowds last
        dets = sorted(dt_of_image.get(image_id, []), key=lambda item: -float(item[1]["score"]))
        dets = dets[:MAX_DETECTIONS[-1]]
        crowd = np.array([int(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        if iou_type == "segm":
            gt_regions = [_to_rle(a["segmentation"], *sizes[image_id]) for a in anns]
        else:
            gt_regions = [list(a["bbox"]) for a in anns]
        dt_regions = [_result_region(r, i, iou_type, sizes[image_id])[0] for i, r in dets]
        ious = compute_ious(dt_regions, gt_regions, list(crowd.astype(int)))  # [D, G]
        yield image_id, anns, dets, crowd, ious


def confusion_matrix(ground_truth, results, iou_type: str = "segm", iou_threshold: float = 0.5,
                     score_thresh: float = CONFUSION_SCORE_THRESH) -> tuple[np.ndarray, list]:
    """Counts [K + 1, K + 1] and the K category ids of rows and columns (see the module docstring).

    Per image, detections with score >= ``score_thresh`` (the 100 best, highest first) are
    matched greedily to the ground truth of any class at IoU >= ``iou_threshold``. A detection
    on a crowd region counts nowhere, and crowds are never "missed".
    """
    gt = _load_json(ground_truth, "ground_truth")
    category_ids = sorted(c["id"] for c in gt["categories"])
    index_of = {c: k for k, c in enumerate(category_ids)}
    num = len(category_ids)
    matrix = np.zeros((num + 1, num + 1), dtype=np.int64)
    for _, anns, dets, crowd, ious in image_overlaps(gt, results, iou_type, score_thresh):
        matched = match_detections(ious, crowd, crowd, iou_threshold)  # [D], -1: none
        for (_, result), g in zip(dets, matched):
            predicted = index_of[result["category_id"]]
            if g < 0:
                matrix[num, predicted] += 1  # background: matches no object
            elif not crowd[g]:
                matrix[index_of[anns[g]["category_id"]], predicted] += 1
        taken = set(int(g) for g in matched if g >= 0)
        for g, ann in enumerate(anns):
            if not crowd[g] and g not in taken:
                matrix[index_of[ann["category_id"]], num] += 1  # missed
    return matrix, category_ids


def format_per_class_table(per_class: dict, agnostic: dict, overall: dict, names: dict) -> str:
    """Text table (in %): per category AP / AP50 / AP75 for bbox and segm, then all classes
    (class-aware, as COCO reports) and class-agnostic.

    per_class: ``{iou_type: {category_id: {...}}}``; agnostic, overall: ``{iou_type: {...}}``;
    names: ``{category_id: name}``.
    """
    iou_types = list(per_class)
    width = max([len("class-agnostic")] + [len(str(n)) for n in names.values()]) + 2
    header = " " * width + "".join(f"{t + ' ' + n:>11}" for t in iou_types for n in PER_CLASS_NAMES)

    def row(label, values_of):
        cells = "".join(f"{100 * v:11.1f}" if v > -1 else f"{'-':>11}"
                        for t in iou_types for v in (values_of(t)[n] for n in PER_CLASS_NAMES))
        return f"{label:<{width}}{cells}"

    category_ids = sorted(per_class[iou_types[0]])
    lines = ["AP per class (%)", header]
    lines += [row(str(names.get(c, c)), lambda t, c=c: per_class[t][c]) for c in category_ids]
    lines.append(row("all (by class)", lambda t: overall[t]))
    lines.append(row("class-agnostic", lambda t: agnostic[t]))
    return "\n".join(lines)


__all__ = ["CONFUSION_SCORE_THRESH", "class_agnostic_ap", "confusion_matrix", "format_per_class_table",
           "image_overlaps", "merge_categories", "per_category_ap"]
