"""Panoptic fusion: instance masks and a semantic map -> one segment per pixel.

The rule of Panoptic FPN as Detectron2 implements it (``combine_semantic_and_instance_outputs``;
the COCO panoptic API's combine script uses the same one). Instance masks are preferred
over semantic labels for thing pixels:

1. Instances, best score first. Stop at the first one scoring below ``score_thresh``.
2. An instance with an empty mask is skipped; so is one whose mask lies more than
   ``overlap_thresh`` of its own area on pixels already taken (it mostly duplicates a
   better instance). Any other instance takes only the still-free pixels of its mask.
3. Stuff: each stuff class of the semantic argmax (the "thing" class 0 skipped) takes its
   still-free pixels, if there are at least ``stuff_area_thresh`` of them (small stuff
   regions are mostly noise).
4. Pixels nobody took stay void (segment id 0).

Segment ids are 1, 2, ... in the order segments are placed. ``segments_info`` follows the
COCO panoptic format: ``id``, ``category_id``, ``isthing``, ``area``, ``bbox`` [x, y, w, h]
and ``iscrowd`` (always 0 for predictions), plus ``score`` and ``instance_id`` (the
detection's index) for things.

Shape shorthand: D detections, H, W the image.
"""

from __future__ import annotations

import torch

from minimrcnn.modeling.semantic_head import THING_CLASS

VOID = 0  # segment id of pixels that belong to no segment


def segment_bbox(inside: torch.Tensor) -> list[int]:
    """[x, y, w, h] (COCO, integer pixels) of the True pixels of ``inside`` [H, W]."""
    rows = torch.nonzero(inside.any(dim=1)).flatten()
    cols = torch.nonzero(inside.any(dim=0)).flatten()
    if rows.numel() == 0:
        return [0, 0, 0, 0]
    x, y = int(cols[0]), int(rows[0])
    return [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1]


def fuse(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, semantic: torch.Tensor, *,
         score_thresh: float = 0.5, overlap_thresh: float = 0.5, stuff_area_thresh: int = 4096,
         thing_category_ids=None, stuff_category_ids=None) -> tuple[torch.Tensor, list[dict]]:
    """Fuse instances and a semantic map into a panoptic segmentation (see the module docstring).

    Args:
        masks: [D, H, W] bool (or 0/1) instance masks, as ``MaskRCNN.predict`` gives them.
        scores: [D] detection scores; labels: [D] thing labels 1..K.
        semantic: [H, W] int64 semantic class per pixel (the argmax of the semantic logits):
            0 is "any thing", 1..S stuff classes.
        score_thresh, overlap_thresh, stuff_area_thresh: the rule's three thresholds
            (Detectron2's defaults: 0.5, 0.5, 4096 pixels).
        thing_category_ids: label -> category id (``thing_category_ids[label]``); by default the
            label itself.
        stuff_category_ids: semantic class -> category id (``stuff_category_ids[class]``); by
            default the class itself (``isthing`` then tells a stuff 1 from a thing label 1).
    Returns:
        (panoptic [H, W] int64 segment ids, 0 = void; segments_info, a list of dicts).
    """
    if masks.dim() != 3:
        raise ValueError(f"masks: expected [D, H, W], got {tuple(masks.shape)}")
    if semantic.shape != masks.shape[1:]:
        raise ValueError(f"semantic: expected [H, W] = {tuple(masks.shape[1:])} like the masks, "
                         f"got {tuple(semantic.shape)}")
    if not (scores.shape == labels.shape == masks.shape[:1]):
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)}: expected "
                         f"[{masks.shape[0]}], one per mask")
    masks = masks.to(torch.bool)
    panoptic = torch.zeros(semantic.shape, dtype=torch.int64, device=semantic.device)  # all void
    segments_info: list[dict] = []

    # Steps 1 and 2: things, best score first (a stable sort: equal scores keep their order).
    order = torch.sort(scores, descending=True, stable=True).indices
    for index in order.tolist():
        score = float(scores[index])
        if score < score_thresh:
            break  # every later instance scores lower still
        mask = masks[index]
        mask_area = int(mask.sum())
        if mask_area == 0:
            continue
        taken_area = int((mask & (panoptic != VOID)).sum())
        if taken_area / mask_area > overlap_thresh:
            continue  # mostly covered by better instances
        free_part = mask & (panoptic == VOID)
        segment_id = len(segments_info) + 1
        panoptic[free_part] = segment_id
        label = int(labels[index])
        segments_info.append({
            "id": segment_id,
            "category_id": int(thing_category_ids[label]) if thing_category_ids is not None else label,
            "isthing": 1,
            "area": int(free_part.sum()),
            "bbox": segment_bbox(free_part),
            "iscrowd": 0,
            "score": score,
            "instance_id": index,
        })

    # Step 3: stuff, one candidate region per semantic class, in class order.
    for semantic_class in torch.unique(semantic).tolist():
        if semantic_class == THING_CLASS:
            continue  # thing pixels come from the instances only
        free_part = (semantic == semantic_class) & (panoptic == VOID)
        area = int(free_part.sum())
        if area < stuff_area_thresh:
            continue
        segment_id = len(segments_info) + 1
        panoptic[free_part] = segment_id
        segments_info.append({
            "id": segment_id,
            "category_id": int(stuff_category_ids[semantic_class]) if stuff_category_ids is not None
            else semantic_class,
            "isthing": 0,
            "area": area,
            "bbox": segment_bbox(free_part),
            "iscrowd": 0,
        })
    # Step 4: what is left is void already.
    return panoptic, segments_info


__all__ = ["VOID", "fuse", "segment_bbox"]
