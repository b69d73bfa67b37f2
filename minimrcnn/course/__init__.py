"""Self-checking classroom exercises: ``check_<name>(student_fn)`` for every exercise.

Each checker runs the student's function against the package's own implementation on
fixed and random inputs (with the edge cases that matter), prints "✓ N cases passed"
or, at the first mismatch, the input, the expected and the obtained value and a hint,
and returns a ``CheckResult`` (truthy when every case passed). It never raises unless
asked to (``strict=True``, or the MINIMRCNN_COURSE_STRICT environment variable).

    notebook 00  check_rle_counts, check_polygon_area
    notebook 01  check_bilinear, check_roi_pool_bins, check_roi_align_sample_grid
    notebook 02  check_residual_block_output_shape, check_pyramid_shapes
    notebook 03  check_box_iou, check_encode_boxes, check_decode_boxes, check_nms
    notebook 04  check_subsample_labels, check_fpn_level
    notebook 05  check_mask_loss, check_paste_mask
    notebook 06  check_average_precision, check_match_detections
    notebook 07  check_pq_match, check_fuse_things
    notebook 08  check_roi_warp, check_softmax_mask_loss
"""

from minimrcnn.course.ablation_checks import check_roi_warp, check_softmax_mask_loss
from minimrcnn.course.backbone_checks import check_pyramid_shapes, check_residual_block_output_shape
from minimrcnn.course.box_checks import check_box_iou, check_decode_boxes, check_encode_boxes, check_nms
from minimrcnn.course.data_checks import check_polygon_area, check_rle_counts
from minimrcnn.course.eval_checks import check_average_precision, check_match_detections
from minimrcnn.course.harness import CheckResult, ExerciseFailed
from minimrcnn.course.head_checks import check_fpn_level, check_mask_loss, check_paste_mask, check_subsample_labels
from minimrcnn.course.panoptic_checks import check_fuse_things, check_pq_match
from minimrcnn.course.roi_checks import check_bilinear, check_roi_align_sample_grid, check_roi_pool_bins

CHECKERS = {
    "00_data": ["check_rle_counts", "check_polygon_area"],
    "01_roi_pool_vs_roi_align": ["check_bilinear", "check_roi_pool_bins", "check_roi_align_sample_grid"],
    "02_backbone_fpn": ["check_residual_block_output_shape", "check_pyramid_shapes"],
    "03_anchors_rpn": ["check_box_iou", "check_encode_boxes", "check_decode_boxes", "check_nms"],
    "04_roi_heads": ["check_subsample_labels", "check_fpn_level"],
    "05_mask_head": ["check_mask_loss", "check_paste_mask"],
    "06_train_and_evaluate": ["check_average_precision", "check_match_detections"],
    "07_panoptic": ["check_pq_match", "check_fuse_things"],
    "08_ablations": ["check_roi_warp", "check_softmax_mask_loss"],
}

__all__ = ["CHECKERS", "CheckResult", "ExerciseFailed"] + [name for names in CHECKERS.values() for name in names]
