"""COCO evaluation: pycocotools as the judge, and a readable implementation of COCO AP.

``minimrcnn.evaluation.coco_ap`` is the function (the twelve summary numbers); its
module's other steps are imported as ``from minimrcnn.evaluation.coco_ap import ...``.
"""

from minimrcnn.evaluation.coco import evaluate_coco, format_ap_table, predictions_to_coco_results
from minimrcnn.evaluation.coco_ap import coco_ap
from minimrcnn.evaluation.inference import predict_dataset

__all__ = ["coco_ap", "evaluate_coco", "format_ap_table", "predict_dataset",
           "predictions_to_coco_results"]
