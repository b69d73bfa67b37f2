"""The training targets of a whole batch at once: padded ground truth, matching, sampling.

The per-image functions the notebooks teach (``Matcher``, ``subsample_labels``,
``RoIHeads.sample_proposals_for_image``, ``mask_targets_for_image``) loop over the images
and select with boolean masks: every such selection has a data-dependent size, which on
a GPU stops the host until the device has computed it. Here the same steps run once per
batch at fixed shapes:

- ground truth is padded to ``[N, Gmax, ...]`` with a validity mask (crowd regions and
  empty boxes are simply invalid, never removed);
- matching takes the IoU of every image at once, ``[N, Gmax, P]``, with the padded rows
  at IoU -1 (below every threshold, never anybody's best);
- sampling draws a uniform random key per candidate and keeps the top keys (top-k at a
  fixed k, then a rank limit per image): the top ``n`` of i.i.d. uniform keys are a
  uniformly random ``n``-subset, the same distribution ``randperm`` gives the per-image
  sampler (not the same draws);
- losses are masked sums rather than sums over a boolean selection.

Shape shorthand:
    N: images; G: padded ground-truth objects per image; P: predictions (anchors or
    proposal slots) per image; k: sample slots per image
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from minimrcnn.modeling.matcher import IGNORE, NEGATIVE, POSITIVE, Matcher
from minimrcnn.ops.boxes import BoxCoder, box_iou, nms_padded

# The IoU of a padding row: below every threshold, so it matches nobody.
PADDING_IOU = -1.0


@dataclasses.dataclass
class BatchGroundTruth:
    """The ground truth of a batch, padded per image.

    boxes: [N, G, 4] float32 in resized-image pixels (zeros where padded); labels: [N, G]
    int64 (0 where padded); valid: [N, G] bool (False for padding, crowds, empty boxes);
    masks: N tensors [G_i, H_i, W_i] (unpadded, every object, at the original resolution);
    mask_scales: N (sx, sy) that map mask pixels to box coordinates.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    masks: list
    mask_scales: list

    @property
    def num_images(self) -> int:
        return self.boxes.shape[0]


def pad_ground_truth(targets: list[dict], scales: list[tuple[float, float]] | None = None,
                     drop_crowd_and_empty: bool = True) -> BatchGroundTruth:
    """Targets (boxes [G_i, 4] in original pixels, labels [G_i], masks, optional iscrowd)
    -> BatchGroundTruth with boxes scaled by ``scales`` (the model's resize factors).

    The same selection as ``model.training_targets`` — no crowds, no zero-width or
    zero-height boxes — as a validity mask, with no data-dependent shapes. Without
    ``scales`` the boxes are taken as they are and each target's ``mask_scale`` (default
    (1, 1)) is kept; ``drop_crowd_and_empty=False`` keeps every object valid (targets that
    were prepared already, as the RoI heads receive them from direct callers).
    """
    num_images = len(targets)
    if scales is None:
        mask_scales = [tuple(target.get("mask_scale", (1.0, 1.0))) for target in targets]
        scales = [(1.0, 1.0)] * num_images
    else:
        mask_scales = list(scales)
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    # pad_sequence: one op per field for the whole batch, not one copy per image.
    boxes = pad_sequence([target["boxes"].to(torch.float32) for target in targets], batch_first=True)
    labels = pad_sequence([target["labels"] for target in targets], batch_first=True, padding_value=-1)
    present = labels >= 0  # labels are 1..K for real objects; -1 marks the padding
    labels = labels.clamp(min=0)
    valid = present
    if drop_crowd_and_empty:
        nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        valid = present & nonempty
        if any("iscrowd" in target for target in targets):
            crowd = pad_sequence([
                target["iscrowd"] if "iscrowd" in target else torch.zeros_like(target["labels"])
                for target in targets], batch_first=True)
            valid = valid & (crowd == 0)
    # One small tensor of scales for the whole batch, copied without a sync.
    scale = host_to_device([[sx, sy, sx, sy] for sx, sy in scales], torch.float32, device)
    return BatchGroundTruth(
        boxes=boxes * scale[:, None, :],
        labels=labels,
        valid=valid,
        masks=[target["masks"] for target in targets],
        mask_scales=mask_scales,
    )


def host_to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of Python numbers on ``device`` without a host-device sync.

    ``torch.tensor(data, device=cuda)`` copies from pageable memory and waits for the copy;
    from pinned memory with ``non_blocking=True`` the copy is queued on the stream instead
    (PyTorch keeps the pinned buffer alive until the copy has run).
    """
    tensor = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def ground_truth_from_boxes(gt_boxes: list[torch.Tensor], device=None) -> BatchGroundTruth:
    """N tensors [G_i, 4] (already in model coordinates, all valid) -> BatchGroundTruth (no masks)."""
    for boxes in gt_boxes:
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes: expected [M, 4] per image, got {tuple(boxes.shape)}")
    targets = [{"boxes": boxes.to(device) if device is not None else boxes,
                "labels": torch.ones(boxes.shape[0], dtype=torch.int64, device=device or boxes.device),
                "masks": None} for boxes in gt_boxes]
    return pad_ground_truth(targets, drop_crowd_and_empty=False)


def box_iou_batched(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``ops.boxes.box_iou`` per image: [N, G, 4] and [N, P, 4] -> [N, G, P] (same arithmetic)."""
    area_a = (boxes_a[..., 2] - boxes_a[..., 0]) * (boxes_a[..., 3] - boxes_a[..., 1])
    area_b = (boxes_b[..., 2] - boxes_b[..., 0]) * (boxes_b[..., 3] - boxes_b[..., 1])
    top_left = torch.maximum(boxes_a[:, :, None, :2], boxes_b[:, None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, :, None, 2:], boxes_b[:, None, :, 2:])
    width_height = (bottom_right - top_left).clamp(min=0)
    intersection = width_height[..., 0] * width_height[..., 1]
    union = area_a[:, :, None] + area_b[:, None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(union))


def match_batched(matcher: Matcher, iou: torch.Tensor, valid_gt: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Matcher.__call__`` for a batch: iou [N, G, P], valid_gt [N, G] ->
    (matched_gt_index [N, P] int64, match_label [N, P] int8), equal per image to
    ``matcher(iou[n][valid_gt[n]])`` with indices into the padded G.

    An image without valid ground truth gets the first interval's label everywhere
    (background) and index 0, as the Matcher's rule for G = 0.
    """
    iou = torch.where(valid_gt[:, :, None], iou, torch.full_like(iou, PADDING_IOU))
    if iou.shape[1] == 0:
        matched = iou.new_zeros(iou.shape[0], iou.shape[2], dtype=torch.int64)
        label = iou.new_full((iou.shape[0], iou.shape[2]), matcher.labels[0], dtype=torch.int8)
        return matched, label
    best_iou, matched = iou.max(dim=1)  # [N, P], [N, P]
    label = torch.full_like(matched, matcher.labels[0], dtype=torch.int8)
    # Intervals in increasing order: a later (higher) interval overwrites an earlier one.
    for low, interval_label in zip(matcher.thresholds[1:-1], matcher.labels[1:]):
        label = torch.where(best_iou >= low, torch.full_like(label, interval_label), label)
    if matcher.allow_low_quality_matches:
        best_iou_per_gt = iou.max(dim=2, keepdim=True).values  # [N, G, 1]
        is_best = (iou == best_iou_per_gt) & (best_iou_per_gt > 0)  # padding rows: best -1
        label = torch.where(is_best.any(dim=1), torch.full_like(label, POSITIVE), label)
    # Without valid ground truth everything is background at index 0 (the matcher's G = 0 rule).
    any_gt = valid_gt.any(dim=1, keepdim=True)  # [N, 1]
    matched = torch.where(any_gt, matched, torch.zeros_like(matched))
    label = torch.where(any_gt, label, torch.full_like(label, matcher.labels[0]))
    return matched, label


def sample_top_keys(candidates: torch.Tensor, quota: torch.Tensor, max_quota: int, generator=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random subset of at most ``quota[n]`` candidates per image, at fixed shapes.

    candidates: [N, P] bool; quota: [N] int64 (each <= max_quota) ->
    (index [N, k] int64 into P, taken [N, k] bool) with k = min(max_quota, P); the taken
    slots are the first ``min(quota[n], candidates[n].sum())`` of each row.
    """
    num_slots = min(int(max_quota), candidates.shape[1])
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    # Non-candidates get key -1: below every candidate's key in [0, 1).
    keys = torch.where(candidates, keys, torch.full_like(keys, -1.0))
    top_keys, index = keys.topk(num_slots, dim=1)  # sorted, largest first
    rank = torch.arange(num_slots, device=candidates.device)[None, :]
    taken = (top_keys >= 0) & (rank < quota[:, None])
    return index, taken


def subsample_batched(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                      bg_label: int, generator=None):
    """``subsample_labels`` for every row of labels [N, P] (-1 ignored, ``bg_label``
    background, others foreground) at once.

    -> (positive_index [N, k1], positive_taken [N, k1], negative_index [N, k2],
        negative_taken [N, k2]): at most ``int(num_samples * positive_fraction)`` foreground
    per image, background filling up to ``num_samples``.
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    positive = (labels != -1) & (labels != bg_label)
    negative = labels == bg_label
    max_positive = int(num_samples * positive_fraction)
    num_positive = positive.sum(dim=1).clamp(max=max_positive)
    num_negative = (num_samples - num_positive).minimum(negative.sum(dim=1))
    positive_index, positive_taken = sample_top_keys(positive, num_positive, max_positive, generator)
    negative_index, negative_taken = sample_top_keys(negative, num_negative, num_samples, generator)
    return positive_index, positive_taken, negative_index, negative_taken


def sample_anchors_batched(labels: torch.Tensor, batch_size_per_image: int, positive_fraction: float,
                           generator=None) -> torch.Tensor:
    """``rpn.sample_anchors`` at fixed shapes: labels [N, R] in {-1, 0, 1} -> sampled [N, R]."""
    positive_index, positive_taken, negative_index, negative_taken = subsample_batched(
        labels, batch_size_per_image, positive_fraction, NEGATIVE, generator)
    # scatter_reduce-free: every index appears once per row, so plain scatter of flags is exact.
    is_positive = torch.zeros_like(labels, dtype=torch.bool).scatter(1, positive_index, positive_taken)
    is_negative = torch.zeros_like(labels, dtype=torch.bool).scatter(1, negative_index, negative_taken)
    sampled = torch.full_like(labels, IGNORE)
    sampled = torch.where(is_negative, torch.full_like(labels, NEGATIVE), sampled)
    return torch.where(is_positive, torch.full_like(labels, POSITIVE), sampled)


def assign_anchors_batched(anchors: torch.Tensor, ground_truth: BatchGroundTruth, matcher: Matcher
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rpn.assign_targets_to_anchors`` for the padded batch: anchors [R, 4] ->
    (labels [N, R] int64, matched_gt_boxes [N, R, 4]; zeros for images without ground truth)."""
    gt_boxes = ground_truth.boxes.to(anchors)
    num_images, num_objects = gt_boxes.shape[:2]
    iou = box_iou(gt_boxes.reshape(-1, 4), anchors).reshape(num_images, num_objects, anchors.shape[0])  # [N, G, R]
    matched, label = match_batched(matcher, iou, ground_truth.valid)
    matched_boxes = gt_boxes.gather(1, matched[:, :, None].expand(-1, -1, 4)) if num_objects else (
        torch.zeros((num_images, anchors.shape[0], 4), dtype=anchors.dtype, device=anchors.device))
    # An image without ground truth: every anchor is background with a zero box.
    matched_boxes = torch.where(ground_truth.valid.any(dim=1)[:, None, None], matched_boxes,
                                torch.zeros_like(matched_boxes))
    return label.to(torch.int64), matched_boxes


def rpn_losses_masked(
    objectness_logits: torch.Tensor,
    pred_deltas: torch.Tensor,
    anchors: torch.Tensor,
    sampled_labels: torch.Tensor,
    matched_gt_boxes: torch.Tensor,
    box_coder: BoxCoder,
    batch_size_per_image: int,
    box_loss: str = "l1",
    smooth_l1_beta: float = 1.0 / 9,
) -> dict[str, torch.Tensor]:
    """``rpn.rpn_losses`` as masked sums (same values, no boolean selection).

    objectness_logits: [N, R]; pred_deltas: [N, R, 4]; anchors: [R, 4];
    sampled_labels: [N, R] in {-1, 0, 1}; matched_gt_boxes: [N, R, 4].
    """
    num_images, num_anchors = objectness_logits.shape
    normalizer = batch_size_per_image * num_images
    objectness_logits, pred_deltas = objectness_logits.float(), pred_deltas.float()
    sampled = (sampled_labels >= 0).to(objectness_logits.dtype)
    loss_objectness = F.binary_cross_entropy_with_logits(
        objectness_logits, (sampled_labels == POSITIVE).to(objectness_logits.dtype),
        weight=sampled, reduction="sum")
    positive = sampled_labels == POSITIVE  # [N, R]
    all_anchors = anchors[None].expand(num_images, -1, -1)
    # Non-positive anchors regress onto themselves (zero deltas, never NaN); the mask drops them.
    # Targets in the boxes' dtype, as rpn_losses encodes them.
    gt_boxes = torch.where(positive[:, :, None], matched_gt_boxes, all_anchors)
    all_anchors = all_anchors.to(gt_boxes.dtype)
    target_deltas = box_coder.encode(all_anchors.reshape(-1, 4), gt_boxes.reshape(-1, 4))
    target_deltas = target_deltas.reshape(num_images, num_anchors, 4)
    if box_loss == "l1":
        per_anchor = F.l1_loss(pred_deltas, target_deltas, reduction="none")
    else:
        per_anchor = F.smooth_l1_loss(pred_deltas, target_deltas, beta=smooth_l1_beta, reduction="none")
    loss_box = (per_anchor * positive[:, :, None].to(per_anchor.dtype)).sum()
    return {"loss_objectness": loss_objectness / normalizer, "loss_rpn_box": loss_box / normalizer}


@torch.no_grad()
def find_top_proposals_batched(
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
    """``rpn.find_top_proposals_per_image``, with the same result, for all images at once.

    Instead of removing non-finite and too small boxes per image, they are marked invalid
    and sorted last; one NMS call (``ops.boxes.nms_padded``) handles every image and level.
    """
    num_images = len(image_sizes)
    top_boxes, top_logits, top_levels = [], [], []
    per_level = zip(anchors_per_level, objectness_per_level, deltas_per_level)
    for level, (anchors, logits, deltas) in enumerate(per_level):
        num_candidates = min(pre_nms_topk, logits.shape[1])
        level_logits, top_index = logits.topk(num_candidates, dim=1)  # [N, k], [N, k]
        level_deltas = deltas.gather(1, top_index[:, :, None].expand(-1, -1, 4))  # [N, k, 4]
        level_anchors = anchors[top_index]  # [N, k, 4]
        boxes = box_coder.decode(level_deltas.reshape(-1, 4), level_anchors.reshape(-1, 4))
        top_boxes.append(boxes.reshape(num_images, num_candidates, 4))
        top_logits.append(level_logits)
        top_levels.append(torch.full_like(top_index, level))
    boxes = torch.cat(top_boxes, dim=1)  # [N, K, 4]
    logits = torch.cat(top_logits, dim=1)  # [N, K]
    levels = torch.cat(top_levels, dim=1)  # [N, K]

    valid = torch.isfinite(boxes).all(dim=2) & torch.isfinite(logits)
    limits = host_to_device([[w, h, w, h] for h, w in image_sizes], boxes.dtype, boxes.device)
    boxes = boxes.clamp(min=0).minimum(limits[:, None, :])
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid &= (widths > min_box_size) & (heights > min_box_size)
    kept, counts = nms_padded(boxes, logits, levels, valid, nms_thresh, post_nms_topk)  # [N, k]
    kept_boxes = boxes.gather(1, kept[:, :, None].expand(-1, -1, 4))
    kept_logits = logits.gather(1, kept)
    return ([kept_boxes[index, :count] for index, count in enumerate(counts)],
            [kept_logits[index, :count] for index, count in enumerate(counts)])


def sample_rois_batched(proposals: list[torch.Tensor], ground_truth: BatchGroundTruth, matcher: Matcher,
                        batch_size_per_image: int, positive_fraction: float, background: int = 0,
                        generator=None):
    """``RoIHeads.sample_proposals_for_image`` for every image at once.

    proposals: N tensors [P_i, 4]. Each image's candidates are its proposals and its valid
    ground-truth boxes; they are matched, labelled and sampled at fixed shapes, and one
    ``nonzero`` turns the taken slots into rows. Returns, for the R sampled RoIs of the
    batch (image by image, foreground first within an image):
    (image_index [R] int64, boxes [R, 4], gt_classes [R] (0 = background),
     matched_gt_index [R] into the padded G (meaningful where gt_classes > 0)).
    """
    gt_boxes = ground_truth.boxes
    device = gt_boxes.device
    dtype = proposals[0].dtype
    counts = host_to_device([p.shape[0] for p in proposals], torch.int64, device)
    padded = pad_sequence(list(proposals), batch_first=True).detach()  # [N, Pmax, 4]
    proposal_valid = torch.arange(padded.shape[1], device=device)[None, :] < counts[:, None]
    slots = torch.cat([padded, gt_boxes.to(dtype)], dim=1)  # [N, Pmax + G, 4]
    slot_valid = torch.cat([proposal_valid, ground_truth.valid], dim=1)
    num_objects = gt_boxes.shape[1]
    iou = box_iou_batched(gt_boxes.to(dtype), slots)  # [N, G, L]
    matched, label = match_batched(matcher, iou, ground_truth.valid)
    if num_objects > 0:
        gt_classes = torch.where(label == 1, ground_truth.labels.gather(1, matched),
                                 torch.full_like(matched, background))
    else:
        gt_classes = torch.full_like(matched, background)
    gt_classes = torch.where(slot_valid, gt_classes, torch.full_like(gt_classes, IGNORE))
    positive_index, positive_taken, negative_index, negative_taken = subsample_batched(
        gt_classes, batch_size_per_image, positive_fraction, background, generator)
    slot_index = torch.cat([positive_index, negative_index], dim=1)
    taken = torch.cat([positive_taken, negative_taken], dim=1)
    image_index, position = torch.nonzero(taken, as_tuple=True)  # the one sync of the sampling
    slot = slot_index[image_index, position]
    return image_index, slots[image_index, slot], gt_classes[image_index, slot], matched[image_index, slot]


def mask_targets_batched(ground_truth: BatchGroundTruth, image_index: torch.Tensor, boxes: torch.Tensor,
                         matched_gt: torch.Tensor, resolution: int) -> torch.Tensor:
    """``mask_targets_for_image`` for the foreground RoIs of a whole batch, in one RoIAlign call.

    image_index: [F] (ascending); boxes: [F, 4] in model coordinates; matched_gt: [F]
    indices into each image's masks -> [F, M, M] float32 in {0, 1}. With every image's masks
    the same size they are one stack of maps; otherwise each image's masks are a map of their
    own, and ``roi_align_levels`` pools RoI f from its image's (one CUDA launch either way).
    """
    from minimrcnn.modeling.masks import MASK_TARGET_THRESHOLD
    from minimrcnn.ops.roi_align import roi_align, roi_align_levels

    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, resolution, resolution), dtype=torch.float32)
    masks = ground_truth.masks
    device = boxes.device
    scale = host_to_device([[sx, sy, sx, sy] for sx, sy in ground_truth.mask_scales],
                           torch.float32, device)[image_index]
    boxes = boxes.detach().to(torch.float32) / scale  # into each image's mask pixels
    if len({tuple(m.shape[-2:]) for m in masks}) > 1:
        maps = [image_masks[:, None].to(torch.float32) for image_masks in masks]  # (G_n, 1, H_n, W_n)
        rois = torch.cat([matched_gt[:, None].to(torch.float32), boxes], dim=1)
        resampled = roi_align_levels(maps, rois, image_index, resolution, [1.0] * len(maps), sampling_ratio=0,
                                     aligned=True)
        return (resampled[:, 0] >= MASK_TARGET_THRESHOLD).to(torch.float32)
    offsets, total = [], 0
    for image_masks in masks:
        offsets.append(total)
        total += image_masks.shape[0]
    first_mask = host_to_device(offsets, torch.int64, device)[image_index] + matched_gt
    mask_images = torch.cat(list(masks))[:, None].to(torch.float32)  # (sum G, 1, H, W)
    rois = torch.cat([first_mask[:, None].to(torch.float32), boxes], dim=1)
    resampled = roi_align(mask_images, rois, resolution, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (resampled[:, 0] >= MASK_TARGET_THRESHOLD).to(torch.float32)


__all__ = [
    "box_iou_batched",
    "mask_targets_batched",
    "sample_rois_batched",
    "find_top_proposals_batched",
    "rpn_losses_masked",
    "BatchGroundTruth",
    "assign_anchors_batched",
    "ground_truth_from_boxes",
    "host_to_device",
    "match_batched",
    "pad_ground_truth",
    "sample_anchors_batched",
    "sample_top_keys",
    "subsample_batched",
]
