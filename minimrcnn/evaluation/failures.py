"""Failure analysis: what became of each object, and what each detection is, at IoU 0.5.

``classify_failures`` sorts every non-crowd ground-truth object and every kept detection
(score >= ``score_thresh``, the 100 best of an image) into one outcome each. Its first step is
the confusion matrix's (``per_class.image_overlaps``: the IoUs of all detections with all the
objects of an image, whatever the class); its matching is COCO's greedy one
(``coco_ap.match_detections``), run per category as COCO AP does, so a "correct" detection is
exactly a true positive of AP50 (among the detections kept).

Objects (``OBJECT_OUTCOMES``), with IoU the IoU of the detection matched to the object:

- ``good``: matched by a detection of its class with IoU >= ``good_iou`` (0.75, AP75's threshold);
- ``poor_localization``: matched, but 0.5 <= IoU < ``good_iou``: found at AP50, not at AP75;
- ``wrong_class``: no detection of its class matched it, but one of another class overlaps it
  at IoU >= 0.5 (a classification error);
- ``missed``: no detection of any class reaches IoU 0.5 with it.

Detections (``DETECTION_OUTCOMES``), after the error types of TIDE (Bolya et al., 2020), with
IoU the best IoU with an object of the class the outcome names:

- ``correct``: matched to an object of its class;
- ``duplicate``: overlaps an object of its class at IoU >= 0.5 that a higher-scoring
  detection took already;
- ``wrong_class``: overlaps an object of another class at IoU >= 0.5;
- ``mislocalized``: its class is right but its best IoU is in [``background_iou``, 0.5);
- ``background``: none of these (overlaps no object of its class by ``background_iou``, and no
  object of another class by 0.5).

The outcomes are tried in that order. A detection matched to a crowd region is left out (COCO
ignores it), and crowds are never objects. Boxes in the records are COCO's ``[x, y, w, h]``.
"""

from __future__ import annotations

import numpy as np

from minimrcnn.evaluation.coco_ap import _load_json, match_detections
from minimrcnn.evaluation.per_class import CONFUSION_SCORE_THRESH, image_overlaps

OBJECT_OUTCOMES = ("good", "poor_localization", "wrong_class", "missed")
DETECTION_OUTCOMES = ("correct", "duplicate", "wrong_class", "mislocalized", "background")
MATCH_IOU = 0.5  # AP50's threshold: found or not
GOOD_IOU = 0.75  # AP75's threshold: well localized or not
BACKGROUND_IOU = 0.1  # TIDE's background threshold: below it a detection is near no object


def _best(ious: np.ndarray, columns: np.ndarray) -> tuple[float, int]:
    """Highest IoU in the given columns of one row and its column (0.0, -1 when none)."""
    if not columns.any():
        return 0.0, -1
    candidates = np.where(columns, ious, -1.0)
    g = int(candidates.argmax())
    return float(ious[g]), g


def classify_failures(ground_truth, results, iou_type: str = "segm",
                      score_thresh: float = CONFUSION_SCORE_THRESH, good_iou: float = GOOD_IOU,
                      background_iou: float = BACKGROUND_IOU) -> tuple[list[dict], list[dict]]:
    """Outcome of every object and of every kept detection (see the module docstring).

    ground_truth: COCO instances (path or dict); results: COCO results (path or list), as
    ``predictions_to_coco_results`` writes them; iou_type: "segm" (mask IoU) or "bbox".
    Returns ``(objects, detections)``, lists of dicts in image id order:
    objects ``{"image_id", "annotation_id", "category_id", "bbox", "outcome", "iou"}`` (one per
    non-crowd annotation of a known category), detections ``{"image_id", "result_index",
    "category_id", "score", "bbox", "outcome", "iou"}``, highest score first within an image.
    """
    if not 0.0 <= background_iou <= MATCH_IOU <= good_iou <= 1.0:
        raise ValueError(f"thresholds: need 0 <= background_iou ({background_iou}) <= {MATCH_IOU} "
                         f"<= good_iou ({good_iou}) <= 1")
    gt = _load_json(ground_truth, "ground_truth")
    objects, detections = [], []
    for image_id, anns, dets, crowd, ious in image_overlaps(gt, results, iou_type, score_thresh):
        gt_classes = np.array([a["category_id"] for a in anns], dtype=np.int64)  # [G]
        dt_classes = np.array([r["category_id"] for _, r in dets], dtype=np.int64)  # [D]
        matched = np.full(len(dets), -1)  # [D] object index into anns, -1: none
        for category_id in np.unique(dt_classes):
            # COCO's matching within one category: its detections (best first) against its
            # objects, crowds last (anns are sorted that way already).
            rows = np.flatnonzero(dt_classes == category_id)
            columns = np.flatnonzero(gt_classes == category_id)
            if columns.size == 0:
                continue
            found = match_detections(ious[np.ix_(rows, columns)], crowd[columns], crowd[columns], MATCH_IOU)
            matched[rows] = np.where(found >= 0, columns[np.maximum(found, 0)], -1)

        matched_iou = {}  # object index -> IoU of the detection matched to it
        for d, ((index, result), g) in enumerate(zip(dets, matched)):
            if g >= 0 and crowd[g]:
                continue  # on a crowd region: COCO ignores it
            same = (gt_classes == result["category_id"]) & ~crowd
            other = (gt_classes != result["category_id"]) & ~crowd
            same_iou, _ = _best(ious[d], same)
            other_iou, _ = _best(ious[d], other)
            if g >= 0:
                outcome, iou = "correct", float(ious[d, g])
                matched_iou[int(g)] = iou
            elif same_iou >= MATCH_IOU:
                outcome, iou = "duplicate", same_iou
            elif other_iou >= MATCH_IOU:
                outcome, iou = "wrong_class", other_iou
            elif same_iou >= background_iou:
                outcome, iou = "mislocalized", same_iou
            else:
                outcome, iou = "background", max(same_iou, other_iou)
            detections.append({"image_id": image_id, "result_index": index,
                               "category_id": result["category_id"], "score": float(result["score"]),
                               "bbox": list(result.get("bbox", [])), "outcome": outcome, "iou": iou})

        for g, ann in enumerate(anns):
            if crowd[g]:
                continue
            other_class = dt_classes != ann["category_id"]
            other_iou = float(ious[other_class, g].max()) if other_class.any() else 0.0
            if g in matched_iou:
                iou = matched_iou[g]
                outcome = "good" if iou >= good_iou else "poor_localization"
            elif other_iou >= MATCH_IOU:
                outcome, iou = "wrong_class", other_iou
            else:
                outcome, iou = "missed", float(ious[:, g].max()) if len(dets) else 0.0
            objects.append({"image_id": image_id, "annotation_id": ann.get("id"),
                            "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
                            "outcome": outcome, "iou": iou})
    return objects, detections


def count_outcomes(records: list[dict], outcomes, by: str | None = None) -> dict:
    """``{outcome: count}`` over ``records`` (every outcome listed, zeros included), or with
    ``by`` (a record key such as "category_id" or "image_id") ``{value: {outcome: count}}``."""
    if by is None:
        counts = dict.fromkeys(outcomes, 0)
        for record in records:
            counts[record["outcome"]] += 1
        return counts
    groups: dict = {}
    for record in records:
        groups.setdefault(record[by], []).append(record)
    return {value: count_outcomes(group, outcomes) for value, group in sorted(groups.items())}


__all__ = ["BACKGROUND_IOU", "DETECTION_OUTCOMES", "GOOD_IOU", "MATCH_IOU", "OBJECT_OUTCOMES",
           "classify_failures", "count_outcomes"]
