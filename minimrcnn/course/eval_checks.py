"""Checkers for notebook 06: AP from a precision-recall curve, greedy detection matching."""

from __future__ import annotations

import numpy as np

from minimrcnn.course.harness import Case, compare_arrays, compare_scalar, run_checks
from minimrcnn.evaluation.coco_ap import interpolate_precision, match_detections, precision_recall_curve


def average_precision_reference(recall, precision) -> float:
    """COCO's 101-point AP of one raw curve (recall non-decreasing)."""
    recall, precision = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    return float(interpolate_precision(recall, precision).mean())


def _curve(hits, num_gt):
    hits = np.asarray(hits, dtype=bool)
    return precision_recall_curve(hits, ~hits, num_gt)


def _ap_cases() -> list[Case]:
    envelope = ("make precision monotone first: each point takes the best precision at that recall or beyond "
                "(np.maximum.accumulate(precision[::-1])[::-1]).")
    points = ("read the curve at the 101 recall points 0, 0.01, ..., 1 (np.linspace(0, 1, 101)): at each, the "
              "first detection whose recall reaches it (np.searchsorted(recall, points, side='left')); "
              "points never reached count 0; AP is the mean of the 101 values.")
    generator = np.random.default_rng(11)
    curves = [
        ("a perfect detector (3 hits of 3 objects)", _curve([1, 1, 1], 3), points),
        ("hit, miss, hit with 2 objects: a dip in precision", _curve([1, 0, 1], 2), envelope),
        ("miss, hit, miss, hit, hit with 4 objects", _curve([0, 1, 0, 1, 1], 4), envelope),
        ("recall never reaches 1 (2 hits of 5 objects)", _curve([1, 1, 0, 0], 5), points),
        ("recall exactly on a threshold (1 hit of 4 objects = recall 0.25)", _curve([1, 0], 4), points),
        ("no detections at all", (np.zeros(0), np.zeros(0)), "with no detections AP is 0"),
        ("only false positives", _curve([0, 0, 0], 3), "precision 0 everywhere: AP 0"),
    ]
    for count, num_gt in ((30, 20), (100, 60), (12, 40)):
        hits = generator.random(count) < np.linspace(0.9, 0.2, count)
        curves.append((f"{count} random detections, {int(hits.sum())} hits of {num_gt} objects",
                       _curve(hits, num_gt), envelope))
    return [Case(f"{text}: recall {np.round(r, 3).tolist()}, precision {np.round(p, 3).tolist()}", (r, p),
                 average_precision_reference(r, p), hint=hint) for text, (r, p), hint in curves]


def check_average_precision(student_fn, **options):
    """student_fn(recall [N], precision [N] after each detection) -> COCO's 101-point AP (a float)."""
    return run_checks("average_precision", student_fn, _ap_cases(), compare_scalar(atol=1e-9), **options)


def match_reference(ious, iou_threshold):
    """pycocotools' greedy matching of detections (best first) to regular ground truth."""
    ious = np.asarray(ious, dtype=np.float64)
    no = np.zeros(ious.shape[1], dtype=bool)
    return match_detections(ious, no, no, iou_threshold)


def _match_cases() -> list[Case]:
    greedy = ("go through the detections in order (best score first); each takes the still-free ground truth "
              "of highest IoU, if that IoU >= the threshold; a taken object is out of reach for the later ones.")
    generator = np.random.default_rng(12)
    a = np.array
    settings = [
        ("two detections, two objects", a([[0.8, 0.1], [0.2, 0.7]]), 0.5, greedy),
        ("two detections want the same object", a([[0.9, 0.6], [0.95, 0.1]]), 0.5,
         greedy + " The first detection takes object 0 although the second overlaps it more."),
        ("IoU exactly at the threshold", a([[0.5, 0.2]]), 0.5, "an IoU equal to the threshold matches (>=)"),
        ("equal IoUs with two objects", a([[0.7, 0.7], [0.7, 0.7]]), 0.5,
         "of equal IoUs the later object wins (pycocotools replaces its best on >=): detection 0 takes object 1"),
        ("the best object is taken, the next one is good enough", a([[0.9, 0.8], [0.9, 0.6]]), 0.5, greedy),
        ("nothing reaches the threshold", a([[0.4, 0.3], [0.1, 0.49]]), 0.5, "unmatched detections get -1"),
        ("no ground truth", np.zeros((3, 0)), 0.5, "every detection gets -1"),
        ("no detections", np.zeros((0, 4)), 0.5, "an empty result"),
    ]
    for d, g, threshold in ((6, 4, 0.5), (15, 10, 0.75), (8, 8, 0.6)):
        ious = np.round(generator.random((d, g)) ** 2, 2)
        settings.append((f"{d} detections x {g} objects, random IoUs", ious, threshold, greedy))
    return [Case(f"{text}, threshold {threshold}; IoU[detection, object] =\n{ious}", (ious, threshold),
                 match_reference(ious, threshold), hint=hint) for text, ious, threshold, hint in settings]


def check_match_detections(student_fn, **options):
    """student_fn(ious [D, G] with detections best first, iou_threshold) -> matched object index [D] (-1: none)."""
    return run_checks("match_detections", student_fn, _match_cases(), compare_arrays(dtype_kind="i"), **options)
