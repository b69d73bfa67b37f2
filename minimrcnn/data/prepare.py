"""Training targets prepared on the CPU, in the data loader, before the copy to the device.

The model must drop crowd regions and empty boxes and check every target's values (finite
boxes in xyxy order, labels in 1..K-1). Done on the device, each of those reads device values
back (a host-device sync) or builds masks at data-dependent sizes; done here, in the loader's
worker processes, it costs the training step nothing. A prepared target carries
``target["prepared"] = True``; the model then trusts it (and still checks every target that
does not carry the mark: direct callers keep the model's own clear errors).

Shape shorthand: G: objects of one image before, G': after dropping crowds and empty boxes.
"""

from __future__ import annotations

import math

import torch

PREPARED = "prepared"  # the mark: crowds and empty boxes dropped, values checked on the CPU


def check_target_values(where: str, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> None:
    """Raise a ValueError naming the first bad box or label of one CPU target (``where``)."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{where}['boxes']: expected [G, 4], got {tuple(boxes.shape)}")
    if labels.shape != (boxes.shape[0],):
        raise ValueError(f"{where}['labels']: expected [{boxes.shape[0]}], got {tuple(labels.shape)}")
    for index, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        if not all(math.isfinite(value) for value in box):
            raise ValueError(f"{where}['boxes']: box {index} {box} contains NaN or infinite values")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}['boxes']: box {index} {box} has x2 < x1 or y2 < y1 (expected xyxy)")
        if label < 1 or (num_classes is not None and label >= num_classes):
            top = f"1..{num_classes - 1}" if num_classes is not None else ">= 1"
            raise ValueError(f"{where}['labels']: label {label} of object {index} is out of range {top} "
                             "(0 is the background)")


def prepare_training_target(target: dict, num_classes: int | None = None, where: str = "target") -> dict:
    """One CPU target dict (boxes [G, 4] xyxy, labels [G] int64, masks [G, H, W], optional
    iscrowd [G]) -> a new dict without crowds and zero-width or zero-height boxes (boxes, labels,
    masks, iscrowd all [G']), its values checked, marked ``prepared``. Other fields are kept.

    The same selection as the model's (``modeling.model.training_targets``); num_classes, when
    given, bounds the labels as the model does.
    """
    boxes, labels = target["boxes"], target["labels"]
    if boxes.device.type != "cpu":
        raise ValueError(f"{where}['boxes']: prepare targets on the CPU (got {boxes.device})")
    check_target_values(where, boxes, labels, num_classes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "iscrowd" in target:
        keep &= target["iscrowd"] == 0
    prepared = dict(target)
    if not bool(keep.all()):
        for field in ("boxes", "labels", "masks", "iscrowd"):
            if field in target:
                prepared[field] = target[field][keep]
    prepared[PREPARED] = True
    return prepared


def collate_for_training(batch, num_classes: int | None = None):
    """``collate`` that also prepares every target (see ``prepare_training_target``); the error
    names the image (index in the batch and image_id) at fault."""
    images, targets = zip(*batch) if batch else ((), ())
    prepared = [prepare_training_target(target, num_classes,
                                        f"targets[{index}] (image_id {target.get('image_id', '?')})")
                for index, target in enumerate(targets)]
    return list(images), prepared


__all__ = ["PREPARED", "collate_for_training", "prepare_training_target"]
