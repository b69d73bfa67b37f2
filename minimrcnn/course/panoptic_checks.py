"""Checkers for notebook 07 (panoptic): the PQ match rule and the fusion rule for things.

The references are the package's functions (``evaluation.panoptic`` and
``modeling.panoptic.fuse``) where the package has them; until then the rules as
REFERENCE.md states them (COCO panoptic API, Detectron2's fusion), written out below.
"""

from __future__ import annotations

import numpy as np
import torch

from minimrcnn.course.harness import Case, compare_arrays, compare_exact, run_checks

try:
    from minimrcnn.evaluation.panoptic import is_match, matched_iou
except ImportError:  # the PQ module is not in this tree: the rule itself
    def matched_iou(intersection, pred_area, gt_area, pred_on_void):
        return intersection / (pred_area + gt_area - intersection - pred_on_void)

    def is_match(iou):
        return iou > 0.5

try:
    from minimrcnn.modeling.panoptic import fuse as _package_fuse
except ImportError:
    _package_fuse = None


def pq_match_reference(intersection, pred_area, gt_area, pred_on_void) -> bool:
    return bool(is_match(matched_iou(intersection, pred_area, gt_area, pred_on_void)))


def _match_cases() -> list[Case]:
    strict = "a pair matches only when IoU > 0.5, strictly: IoU exactly 0.5 is not a match."
    void = ("the prediction's pixels on void (unlabelled) ground truth are left out of the union: "
            "IoU = inter / (pred_area + gt_area - inter - pred_on_void).")
    settings = [
        ((80, 100, 90, 0), "a clear match", strict),
        ((20, 100, 100, 0), "a clear miss", strict),
        ((100, 150, 150, 0), "IoU exactly 0.5", strict),
        ((60, 100, 100, 0), "IoU 60/140, just under 0.5", strict),
        ((60, 100, 80, 25), "a prediction spilling onto void", void),
        ((50, 100, 100, 0), "IoU 1/3", strict),
        ((50, 100, 50, 49), "almost all of the rest of the prediction is void", void),
        ((2, 3, 3, 0), "IoU exactly 0.5 on tiny segments", strict),
    ]
    generator = np.random.default_rng(13)
    for _ in range(8):
        gt_area, pred_area = generator.integers(10, 400, 2)
        intersection = int(generator.integers(0, min(gt_area, pred_area) + 1))
        void_pixels = int(generator.integers(0, pred_area - intersection + 1))
        settings.append(((intersection, int(pred_area), int(gt_area), void_pixels), "random segments", void))
    return [Case(f"{text}: intersection {i}, pred_area {p}, gt_area {g}, pred_on_void {v}", (i, p, g, v),
                 pq_match_reference(i, p, g, v), hint=hint) for (i, p, g, v), text, hint in settings]


def check_pq_match(student_fn, **options):
    """student_fn(intersection, pred_area, gt_area, pred_on_void) -> True if the pair matches (PQ's rule)."""
    return run_checks("pq_match", student_fn, _match_cases(), compare_exact, **options)


def fuse_things_reference(masks, scores, score_thresh=0.5, overlap_thresh=0.5):
    """Segment ids [H, W] (0 void, 1..N in placement order) from instances alone."""
    masks = torch.as_tensor(masks).to(torch.bool)
    if _package_fuse is not None:
        semantic = torch.zeros(masks.shape[1:], dtype=torch.int64)  # every pixel "thing": no stuff
        labels = torch.ones(len(masks), dtype=torch.int64)
        return _package_fuse(masks, scores, labels, semantic, score_thresh=score_thresh,
                             overlap_thresh=overlap_thresh)[0]
    panoptic = torch.zeros(masks.shape[1:], dtype=torch.int64)
    next_id = 1
    for index in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if float(scores[index]) < score_thresh:
            break
        area = int(masks[index].sum())
        if area == 0 or int((masks[index] & (panoptic > 0)).sum()) / area > overlap_thresh:
            continue
        panoptic[masks[index] & (panoptic == 0)] = next_id
        next_id += 1
    return panoptic


def _fusion_cases() -> list[Case]:
    order = "place instances best score first; each takes only the pixels no better instance took."
    overlap = "skip an instance when more than overlap_thresh (0.5) of its own mask is already taken."
    threshold = "stop at the first instance scoring below score_thresh (scores >= 0.5 are kept)."
    ids = "segment ids are 1, 2, ... in the order the segments are placed (skipped instances get none)."
    def box_mask(h, w, x1, y1, x2, y2):
        m = torch.zeros(h, w, dtype=torch.bool)
        m[y1:y2, x1:x2] = True
        return m
    two = torch.stack([box_mask(6, 8, 0, 0, 4, 4), box_mask(6, 8, 2, 2, 7, 6)])
    duplicate = torch.stack([box_mask(6, 6, 0, 0, 4, 4), box_mask(6, 6, 1, 0, 4, 4), box_mask(6, 6, 4, 4, 6, 6)])
    half = torch.stack([box_mask(4, 8, 0, 0, 4, 4), box_mask(4, 8, 2, 0, 6, 4)])  # exactly half taken
    generator = torch.Generator().manual_seed(14)
    settings = [
        ("two overlapping instances, the first scoring higher", two, torch.tensor([0.9, 0.8]), order),
        ("the same two, the second scoring higher", two, torch.tensor([0.6, 0.8]), order + " " + ids),
        ("a near-duplicate of a better instance", duplicate, torch.tensor([0.9, 0.85, 0.7]), overlap + " " + ids),
        ("an instance exactly half covered", half, torch.tensor([0.9, 0.8]),
         overlap + " Exactly half is not more than half: it is kept."),
        ("scores around the threshold", two, torch.tensor([0.5, 0.49]), threshold),
        ("an empty mask", torch.stack([torch.zeros(5, 5, dtype=torch.bool), box_mask(5, 5, 1, 1, 3, 3)]),
         torch.tensor([0.9, 0.8]), "an instance with an empty mask is skipped (and gets no id)"),
        ("equal scores", two, torch.tensor([0.7, 0.7]), "equal scores keep their input order (stable sort)"),
        ("no instances", torch.zeros(0, 4, 5, dtype=torch.bool), torch.zeros(0), "an all-void (0) map"),
    ]
    for count in (5, 12):
        masks = torch.zeros(count, 16, 16, dtype=torch.bool)
        for k in range(count):
            x1, y1 = torch.randint(0, 12, (2,), generator=generator).tolist()
            w, h = torch.randint(2, 8, (2,), generator=generator).tolist()
            masks[k, y1:y1 + h, x1:x1 + w] = True
        settings.append((f"{count} random instances", masks, torch.rand(count, generator=generator), overlap))
    return [Case(f"{text}: {len(m)} masks of {m.shape[1]}x{m.shape[2]}, scores {[round(s, 2) for s in sc.tolist()]}",
                 (m, sc), fuse_things_reference(m, sc), hint=hint) for text, m, sc, hint in settings]


def check_fuse_things(student_fn, **options):
    """student_fn(masks [D, H, W] bool, scores [D]) -> segment ids [H, W] int64 (0 void), with
    score_thresh 0.5 and overlap_thresh 0.5."""
    return run_checks("fuse_things", student_fn, _fusion_cases(), compare_arrays(dtype_kind="i", tensor=True),
                      **options)
