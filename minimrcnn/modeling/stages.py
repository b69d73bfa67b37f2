"""One image through a model, keeping what every stage of the detector hands to the next.

Notebook 04 inspects a trained model with it, the way matterport's ``inspect_model`` walks
through anchors, proposals and detections: the RPN's proposals and their objectness, the
box head's class scores and class-specific refinements of each proposal, the (proposal,
class) candidates above the score threshold, and the detections that per-class NMS keeps.
The steps are the model's own (``preprocess``, backbone, FPN, ``rpn``, the RoI heads'
pooler, box head and ``detect_boxes``); only the candidates, which ``detect_boxes`` builds
and filters in one go, are rebuilt here by its rule (score > ``score_thresh``, width and
height > ``box_min_size``), and the tests check that NMS over them gives its detections.

Shape shorthand: P proposals, K thing classes (num_classes - 1), C candidates, D detections.
Every box is xyxy in the pixels of the image as given (before the model's resizing).
"""

from __future__ import annotations

import torch

from minimrcnn.modeling.roi_heads import boxes_to_rois
from minimrcnn.ops.boxes import clip_boxes


@torch.no_grad()
def trace_detection_stages(model, image: torch.Tensor) -> dict:
    """Run ``image`` ([3, H, W] float in [0, 1]) through ``model`` (a ``MaskRCNN``, put in
    eval mode for the call) and return its intermediate outputs:

    - ``proposals`` [P, 4] and ``objectness_logits`` [P]: the RPN's output, best first;
    - ``class_scores`` [P, K + 1]: the box head's softmax (column 0 is the background);
    - ``refined_boxes`` [P, K, 4]: each proposal moved by each class's deltas, clipped;
    - ``refined`` [P, 4] and ``refined_labels`` [P] (1..K): each proposal refined for its
      highest-scoring thing class;
    - ``candidates``: dict(boxes [C, 4], scores [C], labels [C], proposal_index [C]): every
      (proposal, class) pair that passes the score threshold and the size filter, before NMS;
    - ``detections``: dict(boxes [D, 4], scores [D], labels [D]): after per-class NMS and the
      top ``detections_per_image``, best first (the boxes ``model.predict`` returns).
    """
    if model.config.box_filtering != "detectron2":
        raise ValueError(f"config.box_filtering: trace_detection_stages rebuilds the 'detectron2' "
                         f"candidates only, got {model.config.box_filtering!r}")
    was_training = model.training
    model.eval()
    try:
        batch = model.preprocess([image])
        features = model.fpn(model.backbone(batch.tensor))
        proposals, objectness_logits, _ = model.rpn(features, batch.image_sizes, None, return_scores=True)
        heads = model.roi_heads
        class_logits, box_deltas = heads.box_head(heads.box_pooler(features, boxes_to_rois(proposals)))
        detections = heads.detect_boxes(class_logits, box_deltas, proposals, batch.image_sizes)[0]
    finally:
        model.train(was_training)

    proposals = proposals[0]
    num_proposals, num_things = len(proposals), model.config.num_classes - 1
    class_scores = class_logits.float().softmax(dim=1)  # [P, K + 1]
    refined_boxes = heads.box_coder.decode(box_deltas.float(), proposals)  # [P, 4K]
    refined_boxes = clip_boxes(refined_boxes.reshape(-1, 4), batch.image_sizes[0])  # (P*K, 4), as detect_boxes
    refined_boxes = refined_boxes.reshape(num_proposals, num_things, 4)  # (P*K, 4) -> (P, K, 4)

    # The candidates detect_boxes builds: (proposal, class) above the threshold, box not empty.
    thing_scores = class_scores[:, 1:]  # [P, K]
    widths = refined_boxes[..., 2] - refined_boxes[..., 0]
    heights = refined_boxes[..., 3] - refined_boxes[..., 1]
    keep = (thing_scores > heads.score_thresh) & (widths > heads.box_min_size) & (heights > heads.box_min_size)
    proposal_index, class_index = torch.nonzero(keep, as_tuple=True)
    best_class = thing_scores.argmax(dim=1)  # [P]

    # Back to the pixels of the image as given (the model may have resized it).
    scale_x, scale_y = batch.scales[0]
    to_original = proposals.new_tensor([scale_x, scale_y, scale_x, scale_y])
    original_size = tuple(image.shape[-2:])

    def original(boxes: torch.Tensor) -> torch.Tensor:
        return clip_boxes(boxes.reshape(-1, 4) / to_original, original_size).reshape(boxes.shape)

    refined_boxes = original(refined_boxes)
    return {
        "proposals": original(proposals),
        "objectness_logits": objectness_logits[0].float(),
        "class_scores": class_scores,
        "refined_boxes": refined_boxes,
        "refined": refined_boxes[torch.arange(num_proposals), best_class],
        "refined_labels": best_class + 1,
        "candidates": {"boxes": refined_boxes[proposal_index, class_index],
                       "scores": thing_scores[proposal_index, class_index],
                       "labels": class_index + 1, "proposal_index": proposal_index},
        "detections": {"boxes": original(detections["boxes"].float()), "scores": detections["scores"].float(),
                       "labels": detections["labels"]},
    }


__all__ = ["trace_detection_stages"]
