"""Non-maximum suppression on the device: the 64-box bitmask scheme.

Greedy NMS is sequential (a box survives only if no *kept* box above it suppresses it), but
the expensive part, the IoU of every pair, is not. So:

1. (device, one thread per (row, box i, block of 64 boxes)) a uint64 word whose bit t says
   "box i suppresses box 64 * block + t": a later box (j > i in score order) of the same class
   with IoU > threshold. Rows are independent problems (images, or images x levels).
2. (host, compiled) one pass down the sorted boxes keeps a box if no kept box has its bit
   set, and ORs the kept box's words into the "removed" mask: N steps of B = ceil(N / 64)
   word operations instead of N^2 IoUs.

Copying the words to the host is the one synchronisation (the number kept is data-dependent
anyway). The IoU is computed with the same operations and types as the CPU loop in
``boxes._greedy_nms`` (extents in the boxes' dtype, intersection and union in float64), so
both keep exactly the same boxes. Words are stored as int64 (torch has no uint64 arithmetic);
bit 63 is the sign bit, which only the host pass reads, as uint64.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import cuda

from minimrcnn.ops._numba import LazyKernel, c_array, cuda_launch  # first: Numba set-up

BLOCK = 64  # boxes per mask word
SINGLE_ROW_MAX = 4096  # boxes NMS-ed as one row; above, one row per class (see batched_nms_bitmask)


def _suppression_masks(boxes, classes, counts, iou_threshold, masks):
    """boxes: [R, K, 4] sorted by decreasing score per row; classes: [R, K]; counts: [R] (boxes
    past a row's count take no part); masks: [R, K, B] int64 (written). No max()/min() builtins:
    numba's CUDA target rejects them."""
    num_rows, num_boxes, num_blocks = masks.shape
    for cell in range(cuda.grid(1), num_rows * num_boxes * num_blocks, cuda.gridsize(1)):
        row = cell // (num_boxes * num_blocks)
        i = (cell // num_blocks) % num_boxes
        block = cell % num_blocks
        word = np.int64(0)
        count = counts[row]
        first = block * BLOCK
        last = first + BLOCK if first + BLOCK < count else count
        if i < count:
            x1, y1, x2, y2 = boxes[row, i, 0], boxes[row, i, 1], boxes[row, i, 2], boxes[row, i, 3]
            area_i = (x2 - x1) * (y2 - y1)  # in the boxes' dtype, as the CPU loop's areas
            for j in range(first if first > i + 1 else i + 1, last):
                if classes[row, j] != classes[row, i]:
                    continue
                bx1, by1, bx2, by2 = boxes[row, j, 0], boxes[row, j, 1], boxes[row, j, 2], boxes[row, j, 3]
                width = (x2 if x2 < bx2 else bx2) - (x1 if x1 > bx1 else bx1)
                height = (y2 if y2 < by2 else by2) - (y1 if y1 > by1 else by1)
                width64 = np.float64(width) if width > 0 else np.float64(0.0)
                height64 = np.float64(height) if height > 0 else np.float64(0.0)
                intersection = width64 * height64
                # the CPU loop's order: areas summed in the boxes' dtype, then the float64 intersection off
                union = np.float64(area_i + (bx2 - bx1) * (by2 - by1)) - intersection
                # union 0 is the CPU loop's 0 / 0 = NaN, which never exceeds the threshold
                if union != 0 and intersection / union > iou_threshold:
                    word |= np.int64(1) << np.int64(j - first)
        masks[row, i, block] = word


def _suppression_signature(real):
    """void(boxes [R, K, 4] `real`, classes [R, K] int64, counts [R] int64, iou_threshold, masks [R, K, B] int64)."""
    return numba.types.void(c_array(real, 3), c_array(np.int64, 2), c_array(np.int64, 1), numba.types.float64,
                            c_array(np.int64, 3))


# box dtype -> the kernel compiled once for it (eager signature: a launch does not type its arguments)
SUPPRESSION_KERNELS = {dtype: LazyKernel(_suppression_masks, _suppression_signature(real))
                       for dtype, real in ((torch.float32, np.float32), (torch.float64, np.float64))}


@numba.njit(cache=True)
def _keep_from_masks(masks, counts, max_kept):  # pragma: no cover - compiled
    """masks: [R, K, B] uint64; counts: [R] -> (kept positions [R, max_kept], number kept [R])."""
    num_rows, _, num_blocks = masks.shape
    kept = np.zeros((num_rows, max_kept), np.int64)
    num_kept = np.zeros(num_rows, np.int64)
    removed = np.zeros(num_blocks, np.uint64)
    for row in range(num_rows):
        removed[:] = 0
        for i in range(counts[row]):
            if num_kept[row] == max_kept:
                break
            if (removed[i // BLOCK] >> np.uint64(i % BLOCK)) & np.uint64(1):
                continue
            kept[row, num_kept[row]] = i
            num_kept[row] += 1
            for b in range(num_blocks):
                removed[b] |= masks[row, i, b]
    return kept, num_kept


def sorted_rows_nms(sorted_boxes, sorted_classes, counts, iou_threshold, max_kept):
    """Greedy NMS of each row of boxes already sorted by decreasing score.

    sorted_boxes: [R, K, 4] float32/float64 and sorted_classes: [R, K] integer, on a CUDA device
    (or on the CPU under Numba's CUDA simulator); counts: [R] boxes taking part per row (the first
    ones) -> (kept positions [R, max_kept] int64 on the host, padded with 0; number kept [R] int64).
    """
    num_rows, num_boxes = sorted_boxes.shape[:2]
    num_blocks = -(-num_boxes // BLOCK)
    masks = torch.empty((num_rows, num_boxes, num_blocks), dtype=torch.int64, device=sorted_boxes.device)
    if sorted_boxes.dtype not in SUPPRESSION_KERNELS:
        raise TypeError(f"sorted_boxes must be float32 or float64, got {sorted_boxes.dtype}")
    if masks.numel() > 0:
        cuda_launch(SUPPRESSION_KERNELS[sorted_boxes.dtype], masks.numel(),
                    (sorted_boxes.detach(), sorted_classes.to(torch.int64), counts.to(torch.int64)),
                    (float(iou_threshold),), (masks,), sorted_boxes.device)
    host_masks = masks.cpu().numpy().view(np.uint64)
    return _keep_from_masks(host_masks, counts.to(torch.int64).cpu().numpy(), int(max_kept))


def batched_nms_bitmask(boxes, scores, classes, iou_threshold, max_kept, single_row_max=SINGLE_ROW_MAX):
    """``boxes.batched_nms`` on the device: [N, 4], [N], [N] -> kept indices [<= max_kept] int64,
    by decreasing score, ties in input order (a stable sort, as the CPU path).

    Up to ``single_row_max`` boxes form one row (classes compared in the kernel); more are split
    into one row per class, so the masks take sum-of-squares of the class sizes, not N^2 words
    (80 classes x 2 images x 1000 boxes would otherwise need gigabytes).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    num_boxes = boxes.shape[0]
    if num_boxes <= single_row_max or num_boxes == 0:
        counts = torch.full((1,), num_boxes, dtype=torch.int64, device=boxes.device)
        kept, num_kept = sorted_rows_nms(boxes.detach()[order][None], classes[order][None], counts,
                                         iou_threshold, max_kept)
        return order[torch.from_numpy(kept[0, : num_kept[0]]).to(order.device)]
    device = boxes.device
    grouped = order[torch.argsort(classes[order], stable=True)]  # by class, each class by score
    _, counts = torch.unique_consecutive(classes[grouped], return_counts=True)
    width = int(counts.max())  # (a sync; the kept count needs one anyway)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    columns = torch.arange(num_boxes, device=device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.zeros((counts.numel(), width), dtype=torch.int64, device=device)
    padded[rows, columns] = grouped  # [G, W] indices into the inputs; past a row's count: unused
    kept, num_kept = sorted_rows_nms(boxes.detach()[padded], torch.zeros_like(padded), counts, iou_threshold,
                                     width)
    taken = torch.from_numpy(np.arange(width)[None, :] < num_kept[:, None]).to(device)
    kept_indices = padded.gather(1, torch.from_numpy(kept).to(device))[taken]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_boxes, device=device)  # position in the stable score order
    return kept_indices[torch.argsort(rank[kept_indices])][:max_kept]
