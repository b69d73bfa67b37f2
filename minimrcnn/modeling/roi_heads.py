"""The second stage: sample RoIs from the proposals, pool them, run the box and mask heads.

Training (``select_training_samples`` then the losses):
1. append each image's ground-truth boxes to its proposals (so every object has at
   least one perfect RoI early in training, when proposals are poor);
2. match RoIs to ground truth at IoU >= 0.5 (below: background);
3. sample ``roi_batch_size_per_image`` RoIs, at most ``roi_positive_fraction`` foreground;
4. box head on all sampled RoIs, mask head on the foreground ones only.

Inference: box head on every proposal -> per-class boxes and scores -> threshold,
per-class NMS, top detections -> mask head on the detected boxes, reading the
channel of the predicted class.

Shape shorthand:
    N: images; P: proposals of one image; G: ground-truth objects of one image
    R: RoIs of the batch; F: foreground RoIs; D: detections
    K: thing classes (num_classes - 1); M: mask resolution
"""

from __future__ import annotations

import torch
from torch import nn

from minimrcnn.modeling import batched
from minimrcnn.modeling.box_head import box_head_losses, build_box_head
from minimrcnn.modeling.mask_head import build_mask_head, mask_loss, mask_probabilities
from minimrcnn.modeling.masks import mask_targets_for_image
from minimrcnn.modeling.matcher import Matcher
from minimrcnn.modeling.poolers import build_pooler
from minimrcnn.modeling.sampling import subsample_labels
from minimrcnn.ops.boxes import BoxCoder, batched_nms, box_iou
from minimrcnn.ops.nms_torchvision import batched_nms_torchvision

BACKGROUND = 0


def boxes_to_rois(boxes_per_image: list[torch.Tensor]) -> torch.Tensor:
    """[P_i, 4] per image -> RoIs [R, 5] as (batch_index, x1, y1, x2, y2)."""
    image_index = torch.cat([
        torch.full((len(boxes), 1), float(index), dtype=boxes.dtype, device=boxes.device)
        for index, boxes in enumerate(boxes_per_image)
    ])
    return torch.cat([image_index, torch.cat(boxes_per_image)], dim=1)


class RoIHeads(nn.Module):
    """Box and mask branches over FPN features. See the module docstring for the steps."""

    def __init__(self, config, in_channels: int):
        super().__init__()
        self.num_classes = config.num_classes
        self.box_pooler = build_pooler(config, config.box_pool_size)
        self.mask_pooler = build_pooler(config, config.mask_pool_size)
        self.box_head = build_box_head(config, in_channels)
        self.mask_head = build_mask_head(config, in_channels)
        self.box_coder = BoxCoder(config.box_reg_weights)
        # One threshold: IoU >= 0.5 is foreground, everything below background.
        self.proposal_matcher = Matcher([config.roi_fg_iou_thresh], [0, 1],
                                        allow_low_quality_matches=False)
        self.batch_size_per_image = config.roi_batch_size_per_image
        self.positive_fraction = config.roi_positive_fraction
        self.box_loss = config.box_loss
        self.classifier_loss_weight = config.classifier_loss_weight
        self.mask_loss = config.mask_loss
        self.mask_resolution = config.mask_resolution
        self.mask_roi_bucket = config.mask_roi_bucket
        self.score_thresh = config.score_thresh
        self.nms_thresh = config.nms_thresh
        self.detections_per_image = config.detections_per_image
        self.box_min_size = config.box_min_size
        self.box_filtering = config.box_filtering

    # ---- training ----

    def sample_proposals_for_image(self, proposals: torch.Tensor, gt_boxes: torch.Tensor,
                                   gt_labels: torch.Tensor):
        """proposals: [P, 4]; gt_boxes: [G, 4]; gt_labels: [G] in 1..K.

        Returns (sampled_proposals [S, 4], gt_classes [S] (0 = background),
        matched_gt_index [S] (meaningful where gt_classes > 0)), foreground first.
        """
        proposals = torch.cat([proposals.detach(), gt_boxes.to(proposals.dtype)])
        matched_gt_index, match_label = self.proposal_matcher(box_iou(gt_boxes, proposals))
        if gt_boxes.shape[0] > 0:
            gt_classes = torch.where(match_label == 1, gt_labels[matched_gt_index],
                                     torch.full_like(matched_gt_index, BACKGROUND))
        else:
            gt_classes = torch.zeros_like(matched_gt_index)
        positive, negative = subsample_labels(gt_classes, self.batch_size_per_image,
                                              self.positive_fraction, BACKGROUND)
        sampled = torch.cat([positive, negative])
        return proposals[sampled], gt_classes[sampled], matched_gt_index[sampled]

    def select_training_samples(self, proposals: list[torch.Tensor], targets: list[dict]):
        """Per image: (sampled proposals [S_i, 4], gt classes [S_i], matched gt index [S_i])."""
        samples = [
            self.sample_proposals_for_image(image_proposals, target["boxes"], target["labels"])
            for image_proposals, target in zip(proposals, targets)
        ]
        return [list(field) for field in zip(*samples)]

    def losses(self, features, proposals, targets) -> dict[str, torch.Tensor]:
        """The three second-stage losses for one batch (training mode).

        The same steps as ``losses_per_image`` (sample, pool, box losses, mask losses)
        with the sampling and the mask targets done for the whole batch at once
        (``modeling.batched``): the same distribution of samples and the same losses.
        ``targets``: per-image dicts (as ``forward``) or a ``batched.BatchGroundTruth``.
        """
        if not isinstance(targets, batched.BatchGroundTruth):
            targets = batched.pad_ground_truth(list(targets), drop_crowd_and_empty=False)
        image_index, boxes, gt_classes, matched = batched.sample_rois_batched(
            proposals, targets, self.proposal_matcher, self.batch_size_per_image,
            self.positive_fraction, BACKGROUND)
        rois = torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)
        class_logits, box_deltas = self.box_head(self.box_pooler(features, rois))

        # Regression targets: background rows regress onto themselves (never read).
        foreground_rows = gt_classes > 0
        if targets.boxes.shape[1] > 0:
            gt_boxes = targets.boxes[image_index, matched].to(boxes.dtype)
            matched_boxes = torch.where(foreground_rows[:, None], gt_boxes, boxes)
        else:
            matched_boxes = boxes
        regression_targets = self.box_coder.encode(boxes, matched_boxes)
        losses = box_head_losses(class_logits, box_deltas, gt_classes, regression_targets,
                                 self.box_loss, self.classifier_loss_weight)

        # The mask branch sees foreground RoIs only.
        foreground = torch.nonzero(foreground_rows).squeeze(1)
        mask_logits = self.mask_head_logits(features, rois[foreground])
        mask_targets = batched.mask_targets_batched(
            targets, image_index[foreground], boxes[foreground], matched[foreground], self.mask_resolution)
        losses["loss_mask"] = mask_loss(mask_logits, gt_classes[foreground], mask_targets,
                                        self.mask_loss)
        return losses

    def losses_per_image(self, features, proposals, targets) -> dict[str, torch.Tensor]:
        """The three second-stage losses, image by image (the form the course teaches;
        ``losses`` computes the same for the whole batch at once)."""
        sampled_proposals, gt_classes_per_image, matched_per_image = (
            self.select_training_samples(proposals, targets)
        )
        rois = boxes_to_rois(sampled_proposals)
        gt_classes = torch.cat(gt_classes_per_image)
        class_logits, box_deltas = self.box_head(self.box_pooler(features, rois))

        # Regression targets: background rows regress onto themselves (never read).
        matched_boxes = torch.cat([
            torch.where((classes > 0)[:, None], target["boxes"][matched], boxes)
            if target["boxes"].shape[0] > 0 else boxes
            for boxes, classes, matched, target in zip(
                sampled_proposals, gt_classes_per_image, matched_per_image, targets)
        ])
        regression_targets = self.box_coder.encode(rois[:, 1:], matched_boxes.to(rois.dtype))
        losses = box_head_losses(class_logits, box_deltas, gt_classes, regression_targets,
                                 self.box_loss, self.classifier_loss_weight)

        # The mask branch sees foreground RoIs only (sampling put them first in each image).
        foreground = torch.nonzero(gt_classes > 0).squeeze(1)
        mask_logits = self.mask_head_logits(features, rois[foreground])
        mask_targets = torch.cat([
            mask_targets_for_image(
                target["masks"], boxes[classes > 0], matched[classes > 0], self.mask_resolution,
                target.get("mask_scale", (1.0, 1.0)),
            )
            for boxes, classes, matched, target in zip(
                sampled_proposals, gt_classes_per_image, matched_per_image, targets)
        ])
        losses["loss_mask"] = mask_loss(mask_logits, gt_classes[foreground], mask_targets,
                                        self.mask_loss)
        return losses

    # ---- inference ----

    def detect_boxes(self, class_logits, box_deltas, proposals, image_sizes) -> list[dict]:
        """Scores and per-class boxes -> per image dict(boxes [D, 4], scores [D], labels [D]).

        class_logits: [R, K+1]; box_deltas: [R, 4K]; proposals: [P_i, 4] per image.
        """
        num_per_image = [len(p) for p in proposals]
        num_things = self.num_classes - 1
        # Under autocast the heads answer in bf16/fp16: decode boxes in float32 (bf16 keeps
        # only 8 bits of mantissa, i.e. whole pixels of error on large images).
        class_logits, box_deltas = class_logits.float(), box_deltas.float()
        scores = class_logits.softmax(dim=1)[:, 1:]  # (R, K+1) -> (R, K): drop background
        boxes = self.box_coder.decode(box_deltas, torch.cat(proposals))
        boxes = boxes.reshape(-1, num_things, 4)  # (R, 4K) -> (R, K, 4)
        # Clip every box to its own image: per-row limits (R, 1).
        image_index = torch.repeat_interleave(
            torch.arange(len(proposals), device=boxes.device),
            torch.tensor(num_per_image, device=boxes.device))
        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)[image_index]
        boxes = torch.stack([
            boxes[..., 0].clamp(min=0).minimum(sizes[:, 1:2]),
            boxes[..., 1].clamp(min=0).minimum(sizes[:, 0:1]),
            boxes[..., 2].clamp(min=0).minimum(sizes[:, 1:2]),
            boxes[..., 3].clamp(min=0).minimum(sizes[:, 0:1]),
        ], dim=2)
        if self.box_filtering == "torchvision":
            return self.select_detections_torchvision(boxes, scores, image_index, len(proposals))
        # One candidate per (RoI, class) above the score threshold, with a non-empty box.
        widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        keep = (scores > self.score_thresh) & (widths > self.box_min_size) & (heights > self.box_min_size)
        roi_index, class_index = torch.nonzero(keep, as_tuple=True)
        boxes, scores = boxes[roi_index, class_index], scores[roi_index, class_index]
        labels, image_index = class_index + 1, image_index[roi_index]
        # NMS within (image, class) groups, all images at once.
        kept = batched_nms(boxes, scores, image_index * self.num_classes + labels, self.nms_thresh)
        detections = []
        for index in range(len(proposals)):
            mine = kept[image_index[kept] == index][: self.detections_per_image]
            detections.append({"boxes": boxes[mine], "scores": scores[mine], "labels": labels[mine]})
        return detections

    def select_detections_torchvision(self, boxes, scores, image_index, num_images: int) -> list[dict]:
        """torchvision's selection (``box_filtering="torchvision"``), image by image.

        boxes: [R, K, 4] clipped; scores: [R, K]; image_index: [R]. Candidates in (RoI, class)
        order with score > score_thresh and w, h >= box_min_size; its batched_nms per class;
        the first ``detections_per_image``.
        """
        labels = torch.arange(1, self.num_classes, device=boxes.device).expand_as(scores)  # (R, K)
        detections = []
        for index in range(num_images):
            mine = image_index == index
            image_boxes, image_scores = boxes[mine].reshape(-1, 4), scores[mine].reshape(-1)
            image_labels = labels[mine].reshape(-1)
            widths = image_boxes[:, 2] - image_boxes[:, 0]
            heights = image_boxes[:, 3] - image_boxes[:, 1]
            keep = torch.where((image_scores > self.score_thresh) & (widths >= self.box_min_size)
                               & (heights >= self.box_min_size))[0]
            image_boxes, image_scores, image_labels = image_boxes[keep], image_scores[keep], image_labels[keep]
            kept = batched_nms_torchvision(image_boxes, image_scores, image_labels,
                                           self.nms_thresh)[: self.detections_per_image]
            detections.append({"boxes": image_boxes[kept], "scores": image_scores[kept],
                               "labels": image_labels[kept]})
        return detections

    def mask_head_logits(self, features, rois: torch.Tensor) -> torch.Tensor:
        """Mask head over rois [F, 5] -> logits [F, classes or 1, M, M].

        With ``mask_roi_bucket`` > 0 the RoI batch is padded to a multiple of it (repeating the
        first RoI) and the padding's logits are dropped: the head treats RoIs independently (no
        batch norm), so the logits and gradients are the same, and on a GPU its convolutions see
        a few batch sizes instead of a new one each step, which cudnn.benchmark can tune once.
        """
        count = rois.shape[0]
        if self.mask_roi_bucket > 0 and count % self.mask_roi_bucket:
            rois = torch.cat([rois, rois[:1].expand(self.mask_roi_bucket - count % self.mask_roi_bucket, -1)])
        return self.mask_head(self.mask_pooler(features, rois))[:count]

    def detect_masks(self, features, detections: list[dict]) -> None:
        """Adds ``mask_probs`` [D, M, M] (predicted class's channel, in [0, 1]) to each detection."""
        rois = boxes_to_rois([d["boxes"] for d in detections])
        labels = torch.cat([d["labels"] for d in detections])
        mask_logits = self.mask_head_logits(features, rois)
        probs = mask_probabilities(mask_logits.float(), labels, self.mask_loss)
        for detection, image_probs in zip(detections, probs.split([len(d["boxes"]) for d in detections])):
            detection["mask_probs"] = image_probs

    def forward(self, features: list[torch.Tensor], proposals: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """features: FPN maps [N, C, Hl, Wl]; proposals: [P_i, 4] per image; image_sizes: (h, w).

        Training (``targets`` given, each with boxes [G, 4], labels [G], masks [G, H, W]
        and optionally mask_scale (sx, sy): mask pixels -> box coordinates):
        returns ({}, losses). Inference: returns (detections, {}), one dict per image with
        boxes [D, 4], scores [D], labels [D] and mask_probs [D, M, M].
        """
        if targets is not None:
            return [], self.losses(features, proposals, targets)
        class_logits, box_deltas = self.box_head(self.box_pooler(features, boxes_to_rois(proposals)))
        detections = self.detect_boxes(class_logits, box_deltas, proposals, image_sizes)
        self.detect_masks(features, detections)
        return detections, {}


def build_roi_heads(config, in_channels: int) -> RoIHeads:
    return RoIHeads(config, in_channels)


__all__ = ["RoIHeads", "boxes_to_rois", "build_roi_heads"]
