"""Non-maximum suppression with torchvision's arithmetic, for its compatibility mode.

Both this and :func:`minimrcnn.ops.boxes.batched_nms` suppress a box when a
higher-scoring box of its class overlaps it with IoU > threshold. They can still
disagree on a pair whose IoU lies within a few float32 steps of the threshold,
because torchvision (``torchvision.ops.batched_nms``, 0.29):

- computes the IoU in the boxes' own precision (float32), as
  ``inter / ((area_i + area_j) - inter)`` with areas ``(x2 - x1) * (y2 - y1)``;
- orders the boxes by a stable descending sort of the scores;
- separates the classes, for up to 1000 boxes on CPU (25,000 on GPUs), by shifting
  each class's boxes by ``class * (max coordinate + 1)`` (which rounds the shifted
  coordinates); above that it runs NMS class by class and re-sorts the kept boxes
  with an unstable descending sort.

Reproducing those steps makes the kept set and its order identical whenever the
inputs are. Shape shorthand: N boxes, K kept.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# torchvision switches from the coordinate shift to a loop over classes above this
# many box coordinates (4 per box): 4000 on CPU, 100,000 on GPUs (0.29).
COORDINATE_TRICK_MAX_ELEMENTS = {"cpu": 4000, "cuda": 100_000}


@numba.njit(cache=True)
def _greedy_nms_float32(x1, y1, x2, y2, order, iou_threshold):  # pragma: no cover - compiled
    """Greedy NMS over boxes given as float32 columns, visited in ``order``.

    Every intermediate stays float32 (as torchvision's C++ kernel computes in the
    boxes' type); only the final comparison promotes to double. Returns kept indices.
    """
    num_boxes = order.shape[0]
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(num_boxes, dtype=np.bool_)
    kept = np.empty(num_boxes, dtype=np.int64)
    num_kept = 0
    zero = np.float32(0.0)
    for position in range(num_boxes):
        i = order[position]
        if suppressed[i]:
            continue
        kept[num_kept] = i
        num_kept += 1
        for later in range(position + 1, num_boxes):
            j = order[later]
            if suppressed[j]:
                continue
            width = max(zero, min(x2[i], x2[j]) - max(x1[i], x1[j]))
            height = max(zero, min(y2[i], y2[j]) - max(y1[i], y1[j]))
            intersection = width * height
            iou = intersection / (areas[i] + areas[j] - intersection)
            if iou > iou_threshold:
                suppressed[j] = True
    return kept[:num_kept]


def nms_torchvision(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes [N, 4] float32, scores [N] -> kept indices [K] int64, by decreasing score."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, stable=True, dim=0, descending=True)[1]
    columns = boxes.detach().to(torch.float32).cpu().numpy()
    kept = _greedy_nms_float32(
        np.ascontiguousarray(columns[:, 0]), np.ascontiguousarray(columns[:, 1]),
        np.ascontiguousarray(columns[:, 2]), np.ascontiguousarray(columns[:, 3]),
        order.cpu().numpy(), float(iou_threshold),
    )
    return torch.from_numpy(kept).to(boxes.device)


def batched_nms_torchvision(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                            iou_threshold: float) -> torch.Tensor:
    """NMS within each class, as torchvision's ``batched_nms``: boxes [N, 4], scores [N],
    classes [N] int -> kept indices [K] int64 into the inputs, by decreasing score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    limit = COORDINATE_TRICK_MAX_ELEMENTS["cuda" if boxes.device.type == "cuda" else "cpu"]
    if boxes.numel() <= limit:
        # One NMS over all classes at once: each class is moved out of reach of the others.
        offsets = classes.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return nms_torchvision(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(classes):
        members = torch.where(classes == class_id)[0]
        keep_mask[members[nms_torchvision(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep_mask)[0]
    return kept[scores[kept].sort(descending=True)[1]]


__all__ = ["batched_nms_torchvision", "nms_torchvision"]
