"""Region Proposal Network (Ren et al. 2015) over an FPN: objectness and box deltas per anchor.

A small head slides over every pyramid level (shared weights) and predicts, for each
of the A anchors of each cell, an objectness logit and 4 deltas that move the anchor
onto an object. Training labels anchors by IoU with the ground truth (>= 0.7 object,
< 0.3 background, in between ignored), samples a balanced 256 of them per image and
scores them with binary cross-entropy and an L1 box loss. Proposals are the best
decoded anchors: top-k per level, clipped, small ones dropped, NMS per level, top-k per image.

Shape shorthand:
    N: images; L: pyramid levels; A: anchors per cell; C: feature channels
    Hi, Wi: size of level i; Ri = Hi * Wi * A anchors on level i; R = sum of Ri
    M: ground-truth boxes of an image; P: proposals kept for an image
Anchors are ordered (y, x, anchor) within a level, levels finest first, everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimrcnn.modeling import batched
from minimrcnn.modeling.anchors import AnchorGenerator
from minimrcnn.modeling.fpn import feature_levels_of
from minimrcnn.modeling.matcher import IGNORE, NEGATIVE, POSITIVE, Matcher
from minimrcnn.modeling.sampling import subsample_labels
from minimrcnn.ops.boxes import BOX_LOSSES, BoxCoder, batched_nms, box_iou, clip_boxes
from minimrcnn.ops.nms_torchvision import batched_nms_torchvision

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # RPN deltas are not rescaled (the box head uses 10, 10, 5, 5)
HEAD_INIT_STD = 0.01
SMOOTH_L1_BETA = 1.0 / 9  # torchvision's RPN value; at beta -> 0 smooth-L1 becomes L1
BOX_FILTERINGS = ("detectron2", "torchvision")


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs to A objectness logits and 4A deltas per cell.

    features: L maps [N, C, Hi, Wi] -> (objectness_logits: L maps [N, A, Hi, Wi],
                                        deltas: L maps [N, 4A, Hi, Wi])
    """

    def __init__(self, in_channels: int, num_anchors_per_cell: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors_per_cell, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, 4 * num_anchors_per_cell, 1)
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            nn.init.normal_(layer.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        objectness_logits, deltas = [], []
        for feature in features:
            hidden = F.relu(self.conv(feature))
            objectness_logits.append(self.objectness_logits(hidden))
            deltas.append(self.anchor_deltas(hidden))
        return objectness_logits, deltas


def flatten_objectness(logits: torch.Tensor) -> torch.Tensor:
    """[N, A, Hi, Wi] -> [N, Hi*Wi*A] in (y, x, anchor) order, like the anchors."""
    # (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A)
    return logits.permute(0, 2, 3, 1).reshape(logits.shape[0], -1)


def flatten_deltas(deltas: torch.Tensor) -> torch.Tensor:
    """[N, 4A, Hi, Wi] -> [N, Hi*Wi*A, 4] in (y, x, anchor) order."""
    num_images, _, height, width = deltas.shape
    # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
    deltas = deltas.reshape(num_images, -1, 4, height, width)
    return deltas.permute(0, 3, 4, 1, 2).reshape(num_images, -1, 4)


# ---------------------------------------------------------------- training targets and losses


def assign_targets_to_anchors(
    anchors: torch.Tensor, gt_boxes_per_image: list[torch.Tensor], matcher: Matcher
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label every anchor of every image by IoU with that image's ground truth.

    anchors: [R, 4] (all levels, shared by the images); gt_boxes_per_image: N tensors [M, 4]
    -> (labels [N, R] int64 in {1 object, 0 background, -1 ignored},
        matched_gt_boxes [N, R, 4]: the best ground truth of each anchor; zeros without ground truth).
    Anchors reaching outside the image are kept (Detectron2's default).
    """
    labels, matched_gt_boxes = [], []
    for gt_boxes in gt_boxes_per_image:
        if gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes: expected [M, 4] per image, got {tuple(gt_boxes.shape)}")
        gt_boxes = gt_boxes.to(anchors)
        if gt_boxes.shape[0] == 0:
            # No objects: every anchor is background (the matcher's rule for G = 0).
            labels.append(torch.full((anchors.shape[0],), NEGATIVE, dtype=torch.int64, device=anchors.device))
            matched_gt_boxes.append(torch.zeros_like(anchors))
            continue
        matched_index, match_label = matcher(box_iou(gt_boxes, anchors))  # [R], [R]
        labels.append(match_label.to(torch.int64))
        matched_gt_boxes.append(gt_boxes[matched_index])
    return torch.stack(labels), torch.stack(matched_gt_boxes)


def sample_anchors(
    labels: torch.Tensor, batch_size_per_image: int, positive_fraction: float, generator=None
) -> torch.Tensor:
    """Keep a balanced random sample of labelled anchors per image; the rest become -1 (ignored).

    labels: [N, R] in {-1, 0, 1} -> [N, R], at most ``batch_size_per_image`` non-ignored per
    image, at most ``positive_fraction`` of them positive (background fills the rest).
    """
    sampled = torch.full_like(labels, IGNORE)
    for image_index, image_labels in enumerate(labels):
        positive, negative = subsample_labels(
            image_labels, batch_size_per_image, positive_fraction, bg_label=NEGATIVE, generator=generator
        )
        sampled[image_index, positive] = POSITIVE
        sampled[image_index, negative] = NEGATIVE
    return sampled


def rpn_losses(
    objectness_logits: torch.Tensor,
    pred_deltas: torch.Tensor,
    anchors: torch.Tensor,
    sampled_labels: torch.Tensor,
    matched_gt_boxes: torch.Tensor,
    box_coder: BoxCoder,
    batch_size_per_image: int,
    box_loss: str = "l1",
) -> dict[str, torch.Tensor]:
    """Objectness BCE over sampled anchors and box regression over positive ones.

    objectness_logits: [N, R]; pred_deltas: [N, R, 4]; anchors: [R, 4];
    sampled_labels: [N, R] in {-1 unused, 0, 1}; matched_gt_boxes: [N, R, 4].
    Both losses are summed and divided by ``batch_size_per_image * N`` (Detectron2), so
    an image with few positives weighs its box loss accordingly.
    -> {"loss_objectness": scalar, "loss_rpn_box": scalar}
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"rpn_box_loss: unknown {box_loss!r}; expected one of {BOX_LOSSES}")
    num_images = objectness_logits.shape[0]
    normalizer = batch_size_per_image * num_images
    # Losses in float32 even under autocast (bf16 deltas would round the targets).
    objectness_logits, pred_deltas = objectness_logits.float(), pred_deltas.float()

    sampled = sampled_labels >= 0  # [N, R]
    loss_objectness = F.binary_cross_entropy_with_logits(
        objectness_logits[sampled], sampled_labels[sampled].float(), reduction="sum"
    )

    positive = sampled_labels == POSITIVE  # [N, R]
    image_index, anchor_index = torch.nonzero(positive, as_tuple=True)
    target_deltas = box_coder.encode(anchors[anchor_index], matched_gt_boxes[image_index, anchor_index])
    positive_deltas = pred_deltas[image_index, anchor_index]  # [num_positive, 4]
    if box_loss == "l1":
        loss_box = F.l1_loss(positive_deltas, target_deltas, reduction="sum")
    else:
        loss_box = F.smooth_l1_loss(positive_deltas, target_deltas, beta=SMOOTH_L1_BETA, reduction="sum")
    return {"loss_objectness": loss_objectness / normalizer, "loss_rpn_box": loss_box / normalizer}


# ---------------------------------------------------------------- proposals


@torch.no_grad()
def find_top_proposals_per_image(
    anchors_per_level: list[torch.Tensor],
    objectness_per_level: list[torch.Tensor],
    deltas_per_level: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_box_size: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode the best anchors into proposals.

    anchors_per_level: L tensors [Ri, 4]; objectness_per_level: L tensors [N, Ri] (logits);
    deltas_per_level: L tensors [N, Ri, 4]; image_sizes: N (height, width) before padding.

    1. per level and image, the ``pre_nms_topk`` highest logits (all images at once);
    2. decode those anchors, clip to the image, drop non-finite boxes and boxes whose
       width or height is not above ``min_box_size`` (Detectron2's ``nonempty``);
    3. NMS at ``nms_thresh`` within each level (the level index acts as the class);
    4. the ``post_nms_topk`` best of what survives, over all levels.
    -> (proposals: N tensors [P, 4], objectness_logits: N tensors [P]), by decreasing logit.
    """
    num_images = len(image_sizes)
    top_boxes, top_logits, top_levels = [], [], []
    per_level = zip(anchors_per_level, objectness_per_level, deltas_per_level)
    for level, (anchors, logits, deltas) in enumerate(per_level):
        num_candidates = min(pre_nms_topk, logits.shape[1])
        level_logits, top_index = logits.topk(num_candidates, dim=1)  # [N, k], [N, k]
        image_index = torch.arange(num_images, device=logits.device)[:, None]  # [N, 1]
        level_deltas = deltas[image_index, top_index]  # [N, k, 4]
        level_anchors = anchors[top_index]  # [N, k, 4]
        boxes = box_coder.decode(level_deltas.reshape(-1, 4), level_anchors.reshape(-1, 4))
        top_boxes.append(boxes.reshape(num_images, num_candidates, 4))
        top_logits.append(level_logits)
        top_levels.append(torch.full_like(top_index, level))
    boxes_per_image = torch.cat(top_boxes, dim=1)  # [N, K, 4], K = sum of the k's
    logits_per_image = torch.cat(top_logits, dim=1)  # [N, K]
    levels_per_image = torch.cat(top_levels, dim=1)  # [N, K]

    proposals, proposal_logits = [], []
    per_image = zip(boxes_per_image, logits_per_image, levels_per_image, image_sizes)
    for boxes, logits, levels, image_size in per_image:
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(logits)
        boxes, logits, levels = boxes[finite], logits[finite], levels[finite]
        boxes = clip_boxes(boxes, image_size)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        large_enough = (widths > min_box_size) & (heights > min_box_size)
        boxes, logits, levels = boxes[large_enough], logits[large_enough], levels[large_enough]
        keep = batched_nms(boxes, logits, levels, nms_thresh, max_kept=post_nms_topk)  # by decreasing logit
        proposals.append(boxes[keep])
        proposal_logits.append(logits[keep])
    return proposals, proposal_logits


@torch.no_grad()
def find_top_proposals_torchvision(
    anchors_per_level: list[torch.Tensor],
    objectness_per_level: list[torch.Tensor],
    deltas_per_level: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_thresh: float,
    min_box_size: float = 1e-3,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`find_top_proposals_per_image` as torchvision's RPN does it (``box_filtering="torchvision"``).

    Same inputs and outputs. Differences: the candidates are ranked by their sigmoid
    probabilities (ties where float32 saturates are broken by position, as
    torchvision's stable sort does), boxes are kept when width and height are
    ``>= min_box_size`` (``remove_small_boxes``), and NMS is
    :func:`~minimrcnn.ops.nms_torchvision.batched_nms_torchvision` with the level as class.
    """
    num_images = len(image_sizes)
    top_boxes, top_logits, top_levels = [], [], []
    for level, (anchors, logits, deltas) in enumerate(zip(anchors_per_level, objectness_per_level,
                                                           deltas_per_level)):
        num_candidates = min(pre_nms_topk, logits.shape[1])
        level_logits, top_index = logits.topk(num_candidates, dim=1)  # [N, k], [N, k]
        image_index = torch.arange(num_images, device=logits.device)[:, None]  # [N, 1]
        boxes = box_coder.decode(deltas[image_index, top_index].reshape(-1, 4),
                                 anchors[top_index].reshape(-1, 4))
        top_boxes.append(boxes.reshape(num_images, num_candidates, 4))
        top_logits.append(level_logits)
        top_levels.append(torch.full_like(top_index, level))
    proposals, proposal_logits = [], []
    per_image = zip(torch.cat(top_boxes, dim=1), torch.cat(top_logits, dim=1),
                    torch.cat(top_levels, dim=1), image_sizes)
    for boxes, logits, levels, image_size in per_image:
        boxes = clip_boxes(boxes, image_size)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        large_enough = (widths >= min_box_size) & (heights >= min_box_size)
        boxes, logits, levels = boxes[large_enough], logits[large_enough], levels[large_enough]
        keep = batched_nms_torchvision(boxes, torch.sigmoid(logits), levels, nms_thresh)[:post_nms_topk]
        proposals.append(boxes[keep])
        proposal_logits.append(logits[keep])
    return proposals, proposal_logits


# ---------------------------------------------------------------- the module


class RPN(nn.Module):
    """Head + anchors + targets + losses + proposals.

    ``forward(features, image_sizes, gt_boxes=None) -> (proposals, losses)``:
    features: L maps [N, C, Hi, Wi] (one per anchor size); image_sizes: N (height, width);
    gt_boxes: N tensors [M, 4] (training only). proposals: N detached tensors [P, 4] sorted by
    decreasing objectness; losses: {"loss_objectness", "loss_rpn_box"} in training, {} in eval.
    """

    def __init__(
        self,
        in_channels: int,
        anchor_sizes=(32, 64, 128, 256, 512),
        aspect_ratios=(0.5, 1.0, 2.0),
        strides=(4, 8, 16, 32, 64),
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_topk: tuple[int, int] = (2000, 1000),  # (train, test), per level
        post_nms_topk: tuple[int, int] = (1000, 1000),  # (train, test), per image
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        box_loss: str = "l1",
        anchor_offset: float = 0.5,
        anchor_rounding: bool = False,
        box_filtering: str = "detectron2",
    ):
        super().__init__()
        if len(anchor_sizes) != len(strides):
            raise ValueError(
                f"anchor_sizes: need one size per pyramid level ({len(strides)} levels), "
                f"got {tuple(anchor_sizes)}"
            )
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"rpn_box_loss: unknown {box_loss!r}; expected one of {BOX_LOSSES}")
        if not bg_iou_thresh <= fg_iou_thresh:
            raise ValueError(
                f"rpn_bg_iou_thresh ({bg_iou_thresh}) must not exceed rpn_fg_iou_thresh ({fg_iou_thresh})"
            )
        if box_filtering not in BOX_FILTERINGS:
            raise ValueError(f"box_filtering: unknown {box_filtering!r}; expected one of {BOX_FILTERINGS}")
        self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios, strides, offset=anchor_offset,
                                                rounded=anchor_rounding)
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_cell)
        # Anchors >= fg are objects, < bg background; every object's best anchors count too.
        self.matcher = Matcher(
            (bg_iou_thresh, fg_iou_thresh), (NEGATIVE, IGNORE, POSITIVE), allow_low_quality_matches=True
        )
        self.box_coder = BoxCoder(RPN_BOX_WEIGHTS)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = tuple(pre_nms_topk)
        self.post_nms_topk = tuple(post_nms_topk)
        self.nms_thresh = nms_thresh
        self.min_box_size = min_box_size
        self.box_loss = box_loss
        self.box_filtering = box_filtering

    def predict_proposals(self, anchors_per_level, objectness_per_level, deltas_per_level, image_sizes):
        """Proposals and their logits per image, with the train or test top-k of the current mode."""
        mode = 0 if self.training else 1
        # torchvision's ranking, size filter and NMS arithmetic (its compatibility mode); otherwise
        # training uses the batched twin (same proposals, no per-image selections: fewer syncs).
        if self.box_filtering == "torchvision":
            find = find_top_proposals_torchvision
        elif self.training:
            find = batched.find_top_proposals_batched
        else:
            find = find_top_proposals_per_image
        # Decode in float32: under bf16 autocast a box corner near 800 px would round by ~4 px.
        return find(
            anchors_per_level,
            [logits.detach().float() for logits in objectness_per_level],
            [deltas.detach().float() for deltas in deltas_per_level],
            image_sizes,
            self.box_coder,
            self.pre_nms_topk[mode],
            self.post_nms_topk[mode],
            self.nms_thresh,
            self.min_box_size,
        )

    def forward(self, features: list[torch.Tensor], image_sizes, gt_boxes=None, return_scores: bool = False):
        """See the class docstring; ``return_scores=True`` adds the proposals' objectness logits
        (N tensors [P]) as a third output."""
        if len(image_sizes) != features[0].shape[0]:
            raise ValueError(f"image_sizes: {len(image_sizes)} sizes for {features[0].shape[0]} images")
        anchors_per_level = self.anchor_generator(features)  # L x [Ri, 4]
        logits_maps, delta_maps = self.head(features)
        objectness_per_level = [flatten_objectness(logits) for logits in logits_maps]  # L x [N, Ri]
        deltas_per_level = [flatten_deltas(deltas) for deltas in delta_maps]  # L x [N, Ri, 4]
        proposals, proposal_logits = self.predict_proposals(
            anchors_per_level, objectness_per_level, deltas_per_level, image_sizes
        )

        losses = {}
        if self.training:
            if isinstance(gt_boxes, batched.BatchGroundTruth):
                ground_truth = gt_boxes
            elif gt_boxes is None or len(gt_boxes) != len(image_sizes):
                raise ValueError("gt_boxes: training needs one [M, 4] tensor per image")
            else:
                ground_truth = batched.ground_truth_from_boxes(gt_boxes, features[0].device)
            if ground_truth.num_images != len(image_sizes):
                raise ValueError("gt_boxes: training needs one [M, 4] tensor per image")
            anchors = torch.cat(anchors_per_level)  # [R, 4]
            # The batched twins of assign_targets_to_anchors / sample_anchors / rpn_losses:
            # the same targets and losses for all images at once, at fixed shapes.
            labels, matched_gt_boxes = batched.assign_anchors_batched(anchors, ground_truth, self.matcher)
            sampled_labels = batched.sample_anchors_batched(labels, self.batch_size_per_image,
                                                            self.positive_fraction)
            losses = batched.rpn_losses_masked(
                torch.cat(objectness_per_level, dim=1),
                torch.cat(deltas_per_level, dim=1),
                anchors,
                sampled_labels,
                matched_gt_boxes,
                self.box_coder,
                self.batch_size_per_image,
                self.box_loss,
                SMOOTH_L1_BETA,
            )
        if return_scores:
            return proposals, proposal_logits, losses
        return proposals, losses


def build_rpn(config, in_channels: int) -> RPN:
    """The RPN of ``config``; anchor strides follow the FPN levels (stride 2**level).

    Without FPN (``backbone_fpn=False``) every anchor size sits on the one stride-16 map.
    """
    if not getattr(config, "backbone_fpn", True):
        return _build_rpn(config, in_channels, (tuple(config.anchor_sizes),), feature_levels_of(config))
    if len(config.anchor_sizes) != len(config.fpn_levels):
        raise ValueError(
            f"anchor_sizes: {len(config.anchor_sizes)} sizes for fpn_levels {tuple(config.fpn_levels)}; "
            "need one size per level"
        )
    return _build_rpn(config, in_channels, config.anchor_sizes, config.fpn_levels)


def _build_rpn(config, in_channels: int, anchor_sizes, levels) -> RPN:
    return RPN(
        in_channels,
        anchor_sizes=anchor_sizes,
        aspect_ratios=config.anchor_aspect_ratios,
        strides=tuple(2**level for level in levels),
        fg_iou_thresh=config.rpn_fg_iou_thresh,
        bg_iou_thresh=config.rpn_bg_iou_thresh,
        batch_size_per_image=config.rpn_batch_size_per_image,
        positive_fraction=config.rpn_positive_fraction,
        pre_nms_topk=(config.rpn_pre_nms_topk_train, config.rpn_pre_nms_topk_test),
        post_nms_topk=(config.rpn_post_nms_topk_train, config.rpn_post_nms_topk_test),
        nms_thresh=config.rpn_nms_thresh,
        min_box_size=config.rpn_min_box_size,
        box_loss=config.rpn_box_loss,
        anchor_offset=config.anchor_offset,
        anchor_rounding=config.anchor_rounding,
        box_filtering=config.box_filtering,
    )


__all__ = [
    "RPN",
    "RPNHead",
    "assign_targets_to_anchors",
    "build_rpn",
    "find_top_proposals_per_image",
    "find_top_proposals_torchvision",
    "flatten_deltas",
    "flatten_objectness",
    "rpn_losses",
    "sample_anchors",
]
