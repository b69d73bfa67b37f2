"""Ops written from scratch: RoIAlign, RoIPool and RoIWarp (NumPy reference, Numba CPU and
Numba CUDA kernels behind one autograd function each) and box operations."""

from minimrcnn.ops import _numba  # noqa: F401  (first: Numba set-up before any kernel is compiled)
from minimrcnn.ops.boxes import (
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    nms,
    remove_small_boxes,
)
from minimrcnn.ops.roi_align import RoIAlign, roi_align
from minimrcnn.ops.roi_pool import RoIPool, roi_pool
from minimrcnn.ops.roi_warp import RoIWarp, roi_warp

__all__ = [
    "BoxCoder",
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
    "roi_warp",
]
