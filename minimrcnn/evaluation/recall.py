"""Proposal recall: the fraction of objects that some proposal covers at a given IoU.

The RPN's own quality measure (notebook 03): the second stage can only classify and
refine what the proposals already reach. (No torch import: evaluation/ needs only NumPy
and minimrcnn.ops, whose box_iou takes the tensors as they come.)
"""

from __future__ import annotations

import numpy as np

from minimrcnn.ops.boxes import box_iou


def recall_at_iou(proposals_per_image, gt_boxes_per_image, iou_thresholds=(0.5, 0.7)) -> list[float]:
    """Fraction of ground-truth boxes whose best proposal has IoU >= each threshold.

    proposals_per_image: list of float tensors [P_i, 4] xyxy; gt_boxes_per_image: list of
    float tensors [G_i, 4] xyxy (leave crowd regions out: they are not objects to propose).
    Returns one recall per threshold; 0.0 for every threshold when there is no ground truth.
    """
    if len(proposals_per_image) != len(gt_boxes_per_image):
        raise ValueError(f"proposals_per_image has {len(proposals_per_image)} images, "
                         f"gt_boxes_per_image {len(gt_boxes_per_image)}")
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    found = np.zeros(len(thresholds), dtype=np.int64)
    total = 0
    for proposals, objects in zip(proposals_per_image, gt_boxes_per_image):
        total += len(objects)
        if len(objects) == 0 or len(proposals) == 0:
            continue
        best = box_iou(objects, proposals.to(objects.dtype)).max(dim=1).values.detach().cpu().numpy()  # [G_i]
        found += (best[:, None] >= thresholds[None, :]).sum(axis=0)
    return [0.0] * len(thresholds) if total == 0 else (found / total).tolist()
