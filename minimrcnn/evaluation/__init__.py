"""COCO evaluation: pycocotools as the judge, and a readable implementation of COCO AP.

``minimrcnn.evaluation.coco_ap`` is the function (the twelve summary numbers); its
module's other steps are imported as ``from minimrcnn.evaluation.coco_ap import ...``.
This package needs only NumPy, pycocotools and ``minimrcnn.ops``: running a model over a
dataset (``predict_dataset``) and the ``evaluate`` command live in ``minimrcnn.engine``.
"""

from minimrcnn.evaluation.coco import evaluate_coco, format_ap_table, predictions_to_coco_results
from minimrcnn.evaluation.coco_ap import coco_ap

__all__ = ["coco_ap", "evaluate_coco", "format_ap_table", "predictions_to_coco_results"]
