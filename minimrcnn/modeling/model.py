"""Mask R-CNN (He et al. 2017): the whole model, as composition only.

    images -> normalize, resize, pad -> backbone -> FPN -> RPN proposals
           -> RoI heads (boxes, classes, masks) -> back to original image coordinates

Inputs are lists of float RGB images [3, H, W] in [0, 1] at any sizes; targets (for
training) are dicts with boxes [G, 4] float32 xyxy, labels [G] int64 in 1..K,
masks [G, H, W] uint8/bool and optionally iscrowd [G] int64 (with the semantic head also
sem_seg [H, W], the semantic class per pixel: 0 thing, 1..S stuff, 255 ignored). Crowd regions and
zero-width or zero-height boxes are dropped from training targets (Detectron2 also
leaves crowds out of the losses; an empty box has no defined regression target).

With ``config.semantic_head`` the model is Panoptic FPN (Kirillov et al. 2019): a semantic
branch on P2..P5 trained beside the instance heads, and at inference the fusion of both
into a panoptic segmentation (``minimrcnn.modeling.panoptic.fuse``).

Shape shorthand: N images; G objects of an image; D detections; H, W original size;
S semantic classes (1 thing + stuff).
"""

from __future__ import annotations

import torch
from torch import nn

from minimrcnn.modeling.backbone import build_backbone
from minimrcnn.modeling.batched import pad_ground_truth
from minimrcnn.modeling.fpn import build_fpn
from minimrcnn.modeling.image_list import batch_images
from minimrcnn.modeling.masks import paste_mask_probs_torchvision, paste_masks_in_image
from minimrcnn.modeling.panoptic import fuse
from minimrcnn.modeling.roi_heads import build_roi_heads
from minimrcnn.modeling.rpn import build_rpn
from minimrcnn.modeling.semantic_head import build_semantic_head, semantic_targets
from minimrcnn.ops.boxes import clip_boxes

LOSS_NAMES = ("loss_objectness", "loss_rpn_box", "loss_classifier", "loss_box", "loss_mask")
SEMANTIC_LOSS_NAME = "loss_semantic"  # the sixth loss, only with config.semantic_head
MASK_DTYPES = (torch.uint8, torch.bool)
MASK_PASTES = ("detectron2", "torchvision")


def validate_images(images) -> None:
    if isinstance(images, torch.Tensor) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a list of [3, H, W] tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images: the batch is empty")
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"images[{index}] must be a tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{index}]: expected [3, H, W], got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"images[{index}]: expected a float image in [0, 1], got {image.dtype}")


# The mark of targets prepared on the CPU by minimrcnn.data.prepare (crowds and empty boxes
# dropped, values checked there): the model then skips the checks and the filtering that would
# read device values back. (The key is spelled here too: modeling does not import data.)
PREPARED = "prepared"


def targets_prepared(targets) -> bool:
    """True when every target carries the ``prepared`` mark (and MINIMRCNN_DEBUG_CHECKS is off)."""
    from minimrcnn.ops import _validate

    return (not _validate.DEBUG_CHECKS and isinstance(targets, (list, tuple)) and bool(targets)
            and all(isinstance(t, dict) and t.get(PREPARED) is True for t in targets))


def validate_targets(images: list[torch.Tensor], targets, num_classes: int, check_values: bool = True) -> None:
    """Raise a ValueError/TypeError naming the image index and field of the first bad target.

    check_values=False checks the structure only (fields, shapes, dtypes: no device reads)."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"targets: expected a list of {len(images)} dicts (one per image), "
                         f"got {type(targets).__name__} of length {len(targets) if hasattr(targets, '__len__') else '?'}")
    for index, (image, target) in enumerate(zip(images, targets)):
        where = f"targets[{index}]"
        if not isinstance(target, dict):
            raise TypeError(f"{where}: expected a dict, got {type(target).__name__}")
        for field in ("boxes", "labels", "masks"):
            if field not in target:
                raise ValueError(f"{where}: missing field {field!r}")
            if not isinstance(target[field], torch.Tensor):
                raise TypeError(f"{where}['{field}']: expected a tensor, got {type(target[field]).__name__}")
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{where}['boxes']: expected [G, 4], got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise TypeError(f"{where}['boxes']: expected a float tensor, got {boxes.dtype}")
        num_objects = boxes.shape[0]
        if labels.shape != (num_objects,):
            raise ValueError(f"{where}['labels']: expected [{num_objects}], got {tuple(labels.shape)}")
        if labels.dtype != torch.int64:
            raise TypeError(f"{where}['labels']: expected int64, got {labels.dtype}")
        height, width = image.shape[-2:]
        if masks.shape != (num_objects, height, width):
            raise ValueError(f"{where}['masks']: expected [{num_objects}, {height}, {width}] "
                             f"(objects, image height, width), got {tuple(masks.shape)}")
        if masks.dtype not in MASK_DTYPES:
            raise TypeError(f"{where}['masks']: expected uint8 or bool, got {masks.dtype}")
        if "iscrowd" in target and target["iscrowd"].shape != (num_objects,):
            raise ValueError(f"{where}['iscrowd']: expected [{num_objects}], got {tuple(target['iscrowd'].shape)}")
    if not check_values:
        return
    # The values of the whole batch in one read-back (one device sync instead of three per
    # image); only a batch with a bad value is searched image by image for the message.
    boxes = torch.cat([target["boxes"].detach() for target in targets])
    labels = torch.cat([target["labels"] for target in targets])
    if boxes.shape[0] == 0:
        return
    all_good = (torch.isfinite(boxes).all() & (boxes[:, 2] >= boxes[:, 0]).all() & (boxes[:, 3] >= boxes[:, 1]).all()
                & ((labels >= 1) & (labels < num_classes)).all())
    if bool(all_good):
        return
    for index, target in enumerate(targets):
        check_target_values(f"targets[{index}]", target["boxes"], target["labels"], num_classes)


def check_target_values(where: str, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise a ValueError naming the first bad box or label of one target (``where``)."""
    if boxes.shape[0] > 0:
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{where}['boxes']: contains NaN or infinite values")
        bad = torch.nonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).flatten()
        if bad.numel() > 0:
            raise ValueError(f"{where}['boxes']: box {int(bad[0])} {boxes[bad[0]].tolist()} has "
                             "x2 < x1 or y2 < y1 (expected xyxy)")
        bad = torch.nonzero((labels < 1) | (labels >= num_classes)).flatten()
        if bad.numel() > 0:
            raise ValueError(f"{where}['labels']: label {int(labels[bad[0]])} of object {int(bad[0])} is "
                             f"out of range 1..{num_classes - 1} (0 is the background)")


def validate_semantic_targets(images: list[torch.Tensor], targets, num_classes: int) -> None:
    """Each target needs sem_seg [H, W] of integer labels 0..num_classes-1 or 255 (ignored)."""
    for index, (image, target) in enumerate(zip(images, targets)):
        where = f"targets[{index}]['sem_seg']"
        sem_seg = target.get("sem_seg")
        if not isinstance(sem_seg, torch.Tensor):
            raise ValueError(f"{where}: the semantic head needs a [H, W] tensor of semantic labels "
                             "(use minimrcnn.data.CocoPanoptic)")
        if sem_seg.shape != image.shape[-2:]:
            raise ValueError(f"{where}: expected {tuple(image.shape[-2:])} (image height, width), "
                             f"got {tuple(sem_seg.shape)}")
        if sem_seg.is_floating_point() or sem_seg.dtype == torch.bool:
            raise TypeError(f"{where}: expected integer labels, got {sem_seg.dtype}")
        bad = (sem_seg != 255) & ((sem_seg < 0) | (sem_seg >= num_classes))
        if bad.any():
            raise ValueError(f"{where}: label {int(sem_seg[bad][0])} is out of range 0..{num_classes - 1} "
                             "(or 255, ignored)")


def training_targets(targets: list[dict], scales: list[tuple[float, float]]) -> list[dict]:
    """Targets as the heads use them: no crowd or empty boxes, boxes in resized-image pixels.

    Masks stay at the original resolution; ``mask_scale`` tells the mask-target code
    how to map the resized boxes back onto them (so masks are never resized).
    """
    prepared = []
    for target, (scale_x, scale_y) in zip(targets, scales):
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if "iscrowd" in target:
            keep &= target["iscrowd"] == 0
        scale = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
        prepared.append({
            "boxes": (boxes[keep] * scale).to(torch.float32),
            "labels": target["labels"][keep],
            "masks": target["masks"][keep],
            "mask_scale": (scale_x, scale_y),
        })
    return prepared


class MaskRCNN(nn.Module):
    """``model(images, targets)`` -> the five losses (training); ``model.predict(images)``
    -> per image dict(boxes [D, 4], labels [D], scores [D], masks [D, H, W] bool).

    With ``config.semantic_head`` training adds ``loss_semantic`` and each prediction adds
    ``sem_seg`` [S, H, W] float logits, ``panoptic_seg`` [H, W] int64 segment ids (0 void)
    and ``segments_info`` (COCO panoptic dicts, see ``fuse_panoptic``)."""

    def __init__(self, config):
        super().__init__()
        if config.mask_paste not in MASK_PASTES:
            raise ValueError(f"mask_paste: expected one of {MASK_PASTES}, got {config.mask_paste!r}")
        self.config = config
        self.backbone = build_backbone(config)
        self.fpn = build_fpn(config, self.backbone.out_channels)
        self.rpn = build_rpn(config, config.fpn_channels)
        self.roi_heads = build_roi_heads(config, config.fpn_channels)
        if config.channels_last:
            # NHWC convolutions: much faster for small models on CPU.
            self.backbone.to(memory_format=torch.channels_last)
            self.fpn.to(memory_format=torch.channels_last)
        # Panoptic FPN's semantic branch; without it the model is plain Mask R-CNN (no new parameters).
        self.semantic_head = build_semantic_head(config) if config.semantic_head else None
        if self.semantic_head is not None and config.channels_last:
            self.semantic_head.to(memory_format=torch.channels_last)

    def preprocess(self, images: list[torch.Tensor]):
        """Normalize, resize (a random short side in training) and pad into an ImageBatch."""
        config = self.config
        if self.training:
            min_size = config.min_size[int(torch.randint(len(config.min_size), ()))]
        else:
            min_size = config.min_size_test
        batch = batch_images(images, config.pixel_mean, config.pixel_std, min_size,
                             config.max_size, config.size_divisibility, config.resize_rule)
        if config.channels_last:
            batch.tensor = batch.tensor.contiguous(memory_format=torch.channels_last)
        return batch

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        validate_images(images)
        if self.training:
            if targets is None:
                raise ValueError("targets: required in training mode (call model.eval() or predict())")
            prepared = targets_prepared(targets)  # checked and filtered on the CPU already
            validate_targets(images, targets, self.config.num_classes, check_values=not prepared)
            if self.semantic_head is not None:
                validate_semantic_targets(images, targets, self.semantic_head.num_classes)
        batch = self.preprocess(images)
        features = self.fpn(self.backbone(batch.tensor))
        semantic_logits = self.semantic_head(features) if self.semantic_head is not None else None
        if self.training:
            sem_segs = [target["sem_seg"] for target in targets] if semantic_logits is not None else None
            # Padded per batch with a validity mask (crowds and empty boxes invalid): the
            # batched twin of training_targets, so the heads run once per batch.
            ground_truth = pad_ground_truth(targets, batch.scales, drop_crowd_and_empty=not prepared)
            proposals, rpn_losses = self.rpn(features, batch.image_sizes, ground_truth)
            _, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, ground_truth)
            losses = {**rpn_losses, **roi_losses}
            if semantic_logits is not None:  # sem_seg resized like the image, padding ignored
                gt_semantic = semantic_targets(sem_segs, batch.image_sizes, tuple(batch.tensor.shape[-2:]))
                losses[SEMANTIC_LOSS_NAME] = self.semantic_head.loss(semantic_logits, gt_semantic)
            check_losses_finite(losses)
            return losses
        proposals, _ = self.rpn(features, batch.image_sizes, None)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        if self.config.resize_rule == "torchvision" or self.config.mask_paste == "torchvision":
            for detection, scale, image_size in zip(detections, batch.scales, batch.image_sizes):
                detection["scale"], detection["image_size"] = scale, image_size
        results = [
            self.to_original_image(detection, scale, size)
            for detection, scale, size in zip(detections, batch.scales, original_sizes)
        ]
        if semantic_logits is not None:
            for index, (result, size) in enumerate(zip(results, original_sizes)):
                logits = self.semantic_to_original_image(semantic_logits[index], batch.image_sizes[index], size)
                result["sem_seg"] = logits
                result["panoptic_seg"], result["segments_info"] = self.fuse_panoptic(result, logits)
        return results

    def semantic_to_original_image(self, logits: torch.Tensor, image_size: tuple[int, int],
                                   original_size: tuple[int, int]) -> torch.Tensor:
        """[S, Hp, Wp] logits of a padded batch slot -> [S, H, W]: crop the padding, resize back."""
        height, width = image_size
        logits = logits[:, :height, :width]
        if (height, width) != tuple(original_size):
            logits = torch.nn.functional.interpolate(logits[None], size=original_size, mode="bilinear",
                                                     align_corners=False)[0]
        return logits.float().contiguous()

    def fuse_panoptic(self, result: dict, semantic_logits: torch.Tensor):
        """The panoptic segmentation of one image: its instances and the argmax of its logits.

        Category ids are the model's contiguous ones: thing label l -> l (1..K), stuff
        class s -> K + s, which on a COCO panoptic file with things listed before stuff
        (as in shapes) are its category ids; evaluation maps them to the dataset's.
        """
        config = self.config
        num_things = config.num_classes - 1
        stuff_category_ids = [0] + [num_things + s for s in range(1, self.semantic_head.num_classes)]
        return fuse(result["masks"], result["scores"], result["labels"], semantic_logits.argmax(dim=0),
                    score_thresh=config.panoptic_score_thresh, overlap_thresh=config.panoptic_overlap_thresh,
                    stuff_area_thresh=config.panoptic_stuff_area_thresh, stuff_category_ids=stuff_category_ids)

    def to_original_image(self, detection: dict, scale: tuple[float, float],
                          original_size: tuple[int, int]) -> dict:
        """Boxes back to original pixels; masks pasted into the original image."""
        if self.config.resize_rule == "torchvision" or self.config.mask_paste == "torchvision":
            return to_original_image_torchvision(detection, original_size, self.config)
        scale_x, scale_y = scale
        boxes = detection["boxes"] / detection["boxes"].new_tensor([scale_x, scale_y, scale_x, scale_y])
        boxes = clip_boxes(boxes, original_size).to(torch.float32)
        masks = paste_masks_in_image(detection["mask_probs"], boxes, original_size,
                                     self.config.mask_thresh)
        return {
            "boxes": boxes,
            "labels": detection["labels"].to(torch.int64),
            "scores": detection["scores"].to(torch.float32),
            "masks": masks,
        }

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor]) -> list[dict]:
        """Inference in eval mode without gradients; the previous mode is restored."""
        was_training = self.training
        self.eval()
        try:
            return self(images)
        finally:
            self.train(was_training)


def to_original_image_torchvision(detection: dict, original_size: tuple[int, int], config) -> dict:
    """:meth:`MaskRCNN.to_original_image` with torchvision's conventions where the config asks.

    ``resize_rule="torchvision"``: boxes scaled per axis by float32 ratios original / resized
    size (read back from ``detection["image_size"]``), not clipped again;
    ``mask_paste="torchvision"``: :func:`paste_mask_probs_torchvision`, then ``>= mask_thresh``.
    """
    boxes = detection["boxes"]
    if config.resize_rule == "torchvision":
        resized_height, resized_width = detection["image_size"]
        ratio_height = torch.tensor(original_size[0], dtype=torch.float32) / torch.tensor(
            resized_height, dtype=torch.float32)
        ratio_width = torch.tensor(original_size[1], dtype=torch.float32) / torch.tensor(
            resized_width, dtype=torch.float32)
        ratios = torch.stack((ratio_width, ratio_height, ratio_width, ratio_height)).to(boxes.device)
        boxes = boxes * ratios
    else:
        scale_x, scale_y = detection["scale"]
        boxes = clip_boxes(boxes / boxes.new_tensor([scale_x, scale_y, scale_x, scale_y]), original_size)
    boxes = boxes.to(torch.float32)
    if config.mask_paste == "torchvision":
        masks = paste_mask_probs_torchvision(detection["mask_probs"], boxes, original_size) >= config.mask_thresh
    else:
        masks = paste_masks_in_image(detection["mask_probs"], boxes, original_size, config.mask_thresh)
    return {
        "boxes": boxes,
        "labels": detection["labels"].to(torch.int64),
        "scores": detection["scores"].to(torch.float32),
        "masks": masks,
    }


def check_losses_finite(losses: dict[str, torch.Tensor]) -> None:
    """Raise FloatingPointError naming every loss that is NaN or infinite.

    Checked only when the losses live on the CPU, where reading them back is free. On
    an accelerator the read would stall every step until the forward pass finished;
    there the training engine checks the losses it reads back every log period and
    names the loss and the iteration.
    """
    if any(value.device.type != "cpu" for value in losses.values()):
        return
    bad = [f"{name}={value.item()}" for name, value in losses.items()
           if not torch.isfinite(value.detach()).all()]
    if bad:
        raise FloatingPointError(f"non-finite losses: {', '.join(bad)}; lower the learning rate, "
                                 "enable grad_clip, or check the targets")


__all__ = ["LOSS_NAMES", "SEMANTIC_LOSS_NAME", "MaskRCNN", "check_losses_finite",
           "to_original_image_torchvision", "training_targets", "validate_images",
           "validate_semantic_targets", "validate_targets"]
