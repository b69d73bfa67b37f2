"""Box operations: area, IoU, clipping, the R-CNN box coder and non-maximum suppression.

Boxes are absolute-pixel ``(x1, y1, x2, y2)`` tensors; a box's width is ``x2 - x1``
(no "+1": coordinates are continuous, not inclusive pixel indices).

Shape shorthand: N, M: numbers of boxes; k: boxes per row (class-specific deltas).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from minimrcnn.ops.nms_cuda import batched_nms_bitmask, sorted_rows_nms

# Never let exp(dw) blow up a box beyond 1000/16 times its proposal (Detectron2's clamp).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# The losses offered for regressing BoxCoder deltas (by the RPN and by the box head).
BOX_LOSSES = ("l1", "smooth_l1")


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4], got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {boxes.dtype}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """boxes: [N, 4] xyxy -> areas [N] (negative sizes give negative areas, as in torchvision)."""
    _check_boxes(boxes, "boxes")
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union.

    boxes_a: [N, 4], boxes_b: [M, 4] -> iou [N, M]. A pair whose union is empty
    (two degenerate boxes) has IoU 0.
    """
    _check_boxes(boxes_a, "boxes_a")
    _check_boxes(boxes_b, "boxes_b")
    area_a = box_area(boxes_a)
    area_b = box_area(boxes_b)
    # [N, 1, 2] against [1, M, 2] -> [N, M, 2]
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    width_height = (bottom_right - top_left).clamp(min=0)
    intersection = width_height[..., 0] * width_height[..., 1]
    union = area_a[:, None] + area_b[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(union))


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clamp boxes [N, 4] to an image of size (height, width); returns a new tensor."""
    _check_boxes(boxes, "boxes")
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def remove_small_boxes(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices [K] of the boxes whose width and height are both >= min_size."""
    _check_boxes(boxes, "boxes")
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return torch.nonzero((widths >= min_size) & (heights >= min_size)).flatten()


class BoxCoder:
    """The R-CNN box parameterization (Girshick et al.), shared by the RPN and the box head.

    A ground-truth box relative to a proposal is coded as
    ``dx = wx (gt_cx - cx) / w``, ``dy = wy (gt_cy - cy) / h``,
    ``dw = ww log(gt_w / w)``, ``dh = wh log(gt_h / h)``.
    The weights scale the deltas to unit-ish variance: (1, 1, 1, 1) for the RPN,
    (10, 10, 5, 5) for the box head.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 values, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, proposals: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """proposals: [R, 4], gt_boxes: [R, 4] -> deltas [R, 4] as (dx, dy, dw, dh)."""
        _check_boxes(proposals, "proposals")
        _check_boxes(gt_boxes, "gt_boxes")
        if proposals.shape != gt_boxes.shape:
            raise ValueError(f"proposals {list(proposals.shape)} and gt_boxes "
                             f"{list(gt_boxes.shape)} must have the same shape")
        wx, wy, ww, wh = self.weights
        widths = proposals[:, 2] - proposals[:, 0]
        heights = proposals[:, 3] - proposals[:, 1]
        centre_x = proposals[:, 0] + 0.5 * widths
        centre_y = proposals[:, 1] + 0.5 * heights
        gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_centre_x = gt_boxes[:, 0] + 0.5 * gt_widths
        gt_centre_y = gt_boxes[:, 1] + 0.5 * gt_heights
        dx = wx * (gt_centre_x - centre_x) / widths
        dy = wy * (gt_centre_y - centre_y) / heights
        dw = ww * torch.log(gt_widths / widths)
        dh = wh * torch.log(gt_heights / heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """deltas: [R, 4k] (k boxes per proposal, e.g. one per class), proposals: [R, 4]
        -> boxes [R, 4k]. dw and dh are clamped from above at ``scale_clamp`` before exp."""
        _check_boxes(proposals, "proposals")
        if deltas.dim() != 2 or deltas.shape[1] % 4 != 0 or deltas.shape[0] != proposals.shape[0]:
            raise ValueError(f"deltas must have shape [{proposals.shape[0]}, 4k], "
                             f"got {list(deltas.shape)}")
        proposals = proposals.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = (proposals[:, 2] - proposals[:, 0])[:, None]
        heights = (proposals[:, 3] - proposals[:, 1])[:, None]
        centre_x = proposals[:, 0, None] + 0.5 * widths
        centre_y = proposals[:, 1, None] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_centre_x = dx * widths + centre_x
        pred_centre_y = dy * heights + centre_y
        pred_widths = torch.exp(dw) * widths
        pred_heights = torch.exp(dh) * heights
        boxes = torch.stack(
            (pred_centre_x - 0.5 * pred_widths, pred_centre_y - 0.5 * pred_heights,
             pred_centre_x + 0.5 * pred_widths, pred_centre_y + 0.5 * pred_heights),
            dim=2,
        )  # [R, k, 4]
        return boxes.reshape(deltas.shape)


@numba.njit(cache=True, error_model="numpy")  # 0/0 gives NaN, not an exception
def _greedy_nms(boxes, classes, iou_threshold, max_kept):  # pragma: no cover - compiled
    """boxes [N, 4] sorted by decreasing score; classes [N]. Returns kept positions.

    Keep the best remaining box, drop every later box of the same class whose IoU
    with it exceeds the threshold, repeat; stop once ``max_kept`` boxes are kept
    (every later one scores lower, so it would be cut anyway).
    """
    num_boxes = boxes.shape[0]
    suppressed = np.zeros(num_boxes, dtype=np.bool_)
    kept = np.empty(num_boxes, dtype=np.int64)
    num_kept = 0
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in range(num_boxes):
        if suppressed[i]:
            continue
        kept[num_kept] = i
        num_kept += 1
        if num_kept == max_kept:
            break
        for j in range(i + 1, num_boxes):
            if suppressed[j] or classes[j] != classes[i]:
                continue
            width = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            height = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            intersection = max(width, 0.0) * max(height, 0.0)
            # 0 / 0 is NaN, and NaN > threshold is false: degenerate pairs never suppress.
            iou = intersection / (areas[i] + areas[j] - intersection)
            if iou > iou_threshold:
                suppressed[j] = True
    return kept[:num_kept]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                iou_threshold: float, max_kept: int | None = None) -> torch.Tensor:
    """Non-maximum suppression within each class.

    boxes: [N, 4], scores: [N], classes: [N] integer -> kept indices [K] int64 into
    the inputs, sorted by decreasing score (ties keep input order). A box is
    suppressed by a higher-scoring box of its class with IoU > iou_threshold.
    ``max_kept`` returns only the first ``max_kept`` of those, and stops early:
    the same result as slicing, for a fraction of the work.
    """
    _check_boxes(boxes, "boxes")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {list(scores.shape)}")
    if classes.shape != (boxes.shape[0],):
        raise ValueError(f"classes must have shape [{boxes.shape[0]}], got {list(classes.shape)}")
    limit = boxes.shape[0] if max_kept is None else int(max_kept)
    if boxes.shape[0] == 0 or limit <= 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    if boxes.is_cuda:  # IoU bitmasks on the device, one copy of them, the greedy pass on the host
        return batched_nms_bitmask(boxes, scores, classes, iou_threshold, limit)
    order = torch.argsort(scores, descending=True, stable=True)
    # The greedy loop is sequential: run it compiled on the CPU (boxes are few, a copy is cheap).
    sorted_boxes = boxes.detach()[order].cpu().numpy()
    sorted_classes = classes.detach()[order].cpu().numpy().astype(np.int64)
    kept_positions = _greedy_nms(sorted_boxes, sorted_classes, float(iou_threshold), limit)
    return order[torch.from_numpy(kept_positions).to(order.device)]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        max_kept: int | None = None) -> torch.Tensor:
    """Class-agnostic non-maximum suppression; same contract as ``batched_nms``."""
    return batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), iou_threshold, max_kept)


def nms_padded(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor,
               iou_threshold: float, max_kept: int) -> tuple[torch.Tensor, list[int]]:
    """``batched_nms`` for each row of a padded batch, with one copy to the host for all rows.

    boxes: [N, K, 4]; scores, classes, valid: [N, K] (invalid entries take no part) ->
    (kept [N, max_kept] int64 indices into K, each row by decreasing score and padded with
    0 past its count; counts: N ints). Row n equals
    ``batched_nms(boxes[n][valid[n]], ...)`` mapped back to positions in K.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, K, 4], got {list(boxes.shape)}")
    num_rows, num_boxes = boxes.shape[:2]
    for name, tensor in (("scores", scores), ("classes", classes), ("valid", valid)):
        if tensor.shape != (num_rows, num_boxes):
            raise ValueError(f"{name} must have shape [{num_rows}, {num_boxes}], got {list(tensor.shape)}")
    max_kept = int(max_kept)
    kept = torch.zeros((num_rows, max(max_kept, 0)), dtype=torch.int64, device=boxes.device)
    if num_boxes == 0 or max_kept <= 0:
        return kept, [0] * num_rows
    # Invalid entries sort last (-inf); valid ones by decreasing score, ties in input order.
    keys = torch.where(valid, scores, torch.full_like(scores, -float("inf")))
    order = torch.argsort(keys, dim=1, descending=True, stable=True)  # [N, K]
    sorted_boxes = boxes.detach().gather(1, order[:, :, None].expand(-1, -1, 4))
    sorted_classes = classes.gather(1, order).to(torch.int32)
    sorted_valid = valid.gather(1, order).to(torch.int32)
    if boxes.is_cuda:  # every row in one launch of the bitmask kernel (valid boxes sort first)
        host_kept, host_counts = sorted_rows_nms(sorted_boxes, sorted_classes, sorted_valid.sum(1), iou_threshold,
                                                 max_kept)
        kept = order.gather(1, torch.from_numpy(host_kept).to(order.device))
        return kept, host_counts.tolist()
    # One host copy for all rows: boxes, then the classes and validity flags bit-cast
    # into the boxes' dtype (exact), so nothing is rounded.
    int_dtype = torch.int32 if boxes.dtype == torch.float32 else torch.int64
    flags = torch.stack([sorted_classes, sorted_valid], dim=2).to(int_dtype).view(sorted_boxes.dtype)
    packed = torch.cat([sorted_boxes, flags], dim=2).cpu().numpy()  # [N, K, 6]
    host_boxes = np.ascontiguousarray(packed[:, :, :4])
    host_flags = np.ascontiguousarray(packed[:, :, 4:]).view(np.int32 if int_dtype == torch.int32 else np.int64)
    host_kept = np.zeros((num_rows, max_kept), dtype=np.int64)
    counts = []
    for row in range(num_rows):
        num_valid = int(host_flags[row, :, 1].sum())
        positions = _greedy_nms(host_boxes[row, :num_valid], host_flags[row, :num_valid, 0].astype(np.int64),
                                float(iou_threshold), max_kept)
        host_kept[row, : len(positions)] = positions
        counts.append(len(positions))
    kept = order.gather(1, torch.from_numpy(host_kept).to(order.device))
    return kept, counts
