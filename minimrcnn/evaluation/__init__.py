"""COCO evaluation: pycocotools as the judge, and a readable implementation of COCO AP.

``minimrcnn.evaluation.coco_ap`` is the function (the twelve summary numbers); its
module's other steps are imported as ``from minimrcnn.evaluation.coco_ap import ...``.
This package needs only NumPy, pycocotools and ``minimrcnn.ops``: running a model over a
dataset (``predict_dataset``) and the ``evaluate`` command live in ``minimrcnn.engine``.
``panoptic_quality`` is Panoptic Quality as the COCO panoptic API computes it (its per-image
steps in ``minimrcnn.evaluation.panoptic``); ``panoptic_io`` reads and writes the COCO
panoptic PNG + JSON format.
"""

from minimrcnn.evaluation.coco import evaluate_coco, format_ap_table, predictions_to_coco_results
from minimrcnn.evaluation.coco_ap import coco_ap
from minimrcnn.evaluation.panoptic import format_pq_table, panoptic_quality
from minimrcnn.evaluation.panoptic_io import (load_panoptic_json, read_panoptic_png, segments_info_from_ids,
                                              write_panoptic_png, write_panoptic_predictions)

__all__ = ["coco_ap", "evaluate_coco", "format_ap_table", "format_pq_table", "load_panoptic_json",
           "panoptic_quality", "predictions_to_coco_results", "read_panoptic_png",
           "segments_info_from_ids", "write_panoptic_png", "write_panoptic_predictions"]
