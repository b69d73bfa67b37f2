"""Tests for minimrcnn.modeling.roi_heads: proposal sampling, losses and detection."""

import dataclasses

import pytest
import torch

from minimrcnn import get_config
from minimrcnn.modeling.roi_heads import RoIHeads, boxes_to_rois
from minimrcnn.ops.boxes import box_iou

CHANNELS = 8
IMAGE_SIZE = 64


def tiny_config(**changes):
    base = dataclasses.replace(
        get_config("shapes-cpu"), fpn_channels=CHANNELS, box_head_dim=16, mask_head_dim=8,
        roi_batch_size_per_image=32, roi_positive_fraction=0.25,
    )
    return dataclasses.replace(base, **changes)


def pyramid(num_images=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(num_images, CHANNELS, IMAGE_SIZE // 2**level, IMAGE_SIZE // 2**level,
                        generator=generator) for level in (2, 3, 4, 5)]


def target(boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}


def random_proposals(count, seed):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, generator=generator) * 48
    sizes = torch.rand(count, 2, generator=generator) * 30 + 4
    return torch.cat([corners, corners + sizes], dim=1)


def test_boxes_to_rois_prefixes_the_image_index():
    rois = boxes_to_rois([torch.ones(2, 4), torch.zeros(0, 4), torch.full((1, 4), 2.0)])
    assert rois[:, 0].tolist() == [0, 0, 2]
    assert rois.shape == (3, 5) and rois[2, 1:].tolist() == [2, 2, 2, 2]


def test_sampling_counts_fractions_and_ground_truth_appended():
    torch.manual_seed(0)
    heads = RoIHeads(tiny_config(), CHANNELS)
    gt = target([[5, 5, 25, 25], [30, 30, 60, 50]], [1, 3])
    # Many proposals near the first object (foreground) and many elsewhere.
    near = torch.tensor([[5.0, 5, 25, 25]]) + torch.randn(40, 4) * 0.5
    far = random_proposals(200, seed=1)
    far = far[box_iou(gt["boxes"], far).max(dim=0).values < 0.5]
    sampled, classes, matched = heads.sample_proposals_for_image(torch.cat([near, far]), gt["boxes"], gt["labels"])
    assert len(sampled) == 32
    num_foreground = int((classes > 0).sum())
    assert num_foreground == 8  # 25% of 32: capped although 40+ are available
    assert bool((classes[:num_foreground] > 0).all())  # foreground first
    iou = box_iou(sampled, gt["boxes"])
    for row in range(len(sampled)):
        best = iou[row].max()
        if classes[row] > 0:
            assert best >= 0.5 and classes[row] == gt["labels"][matched[row]]
            assert iou[row, matched[row]] == best
        else:
            assert best < 0.5


def test_ground_truth_boxes_are_appended_to_the_proposals():
    torch.manual_seed(0)
    heads = RoIHeads(tiny_config(), CHANNELS)
    gt = target([[5, 5, 25, 25], [30, 30, 60, 50]], [1, 3])
    # No proposal overlaps anything: the only foreground are the ground-truth boxes themselves.
    proposals = torch.tensor([[0.0, 40, 10, 60]] * 5)
    sampled, classes, matched = heads.sample_proposals_for_image(proposals, gt["boxes"], gt["labels"])
    assert len(sampled) == 7 and classes.tolist()[:2] in ([1, 3], [3, 1])
    torch.testing.assert_close(sampled[:2][classes[:2].argsort()], gt["boxes"])


def test_sampling_picks_proposals_at_random():
    """The RoI sampler draws its foreground and background at random (torch's seed decides):
    different seeds, different picks; over many draws every eligible proposal is picked."""
    heads = RoIHeads(tiny_config(roi_batch_size_per_image=8), CHANNELS)  # 2 foreground + 6 background
    gt = target([[5, 5, 25, 25]], [1])
    near = torch.tensor([[5.0, 5, 25, 25]]) + torch.linspace(-1, 1, 10)[:, None]  # 10 foreground
    far = torch.tensor([[40.0, 40, 50, 50]]) + torch.arange(20.0)[:, None] * 0.5  # 20 background
    proposals = torch.cat([near, far])
    drawn, picks = {}, []
    for seed in range(60):
        torch.manual_seed(seed)
        sampled, classes, _ = heads.sample_proposals_for_image(proposals, gt["boxes"], gt["labels"])
        picks.append(sampled)
        for box in sampled.tolist():
            drawn[tuple(box)] = drawn.get(tuple(box), 0) + 1
    assert not torch.equal(picks[0], picks[1])
    eligible = {tuple(box) for box in torch.cat([proposals, gt["boxes"]]).tolist()}
    assert set(drawn) == eligible  # all 31 (the ground truth box itself too), nothing else


def test_sampling_without_ground_truth_is_all_background():
    heads = RoIHeads(tiny_config(), CHANNELS)
    empty = target([], [])
    sampled, classes, _ = heads.sample_proposals_for_image(random_proposals(100, 2), empty["boxes"], empty["labels"])
    assert len(sampled) == 32 and int(classes.sum()) == 0


@pytest.mark.parametrize("changes", [{}, {"mask_loss": "softmax", "mask_head": "mlp", "roi_op": "pool"},
                                     {"mask_resolution": 28, "box_loss": "smooth_l1"}])
def test_losses_are_finite_and_reach_every_head(changes):
    torch.manual_seed(0)
    heads = RoIHeads(tiny_config(**changes), CHANNELS)
    features = [f.requires_grad_() for f in pyramid()]
    proposals = [random_proposals(50, 3), random_proposals(40, 4)]
    targets = [target([[5, 5, 25, 25], [30, 30, 60, 50]], [1, 3]), target([], [])]
    detections, losses = heads(features, proposals, [(IMAGE_SIZE, IMAGE_SIZE)] * 2, targets)
    assert detections == [] and sorted(losses) == ["loss_box", "loss_classifier", "loss_mask"]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    for module in (heads.box_head, heads.mask_head):
        assert all(p.grad is not None for p in module.parameters())
    assert features[0].grad.abs().sum() > 0


def test_detection_thresholds_nms_and_limits():
    heads = RoIHeads(tiny_config(score_thresh=0.3, nms_thresh=0.5, detections_per_image=2), CHANNELS)
    proposals = [torch.tensor([[10.0, 10, 30, 30], [11, 10, 31, 30], [40, 40, 60, 60], [0, 0, 8, 8]]),
                 torch.tensor([[70.0, 70, 90, 90]])]  # outside a 64 x 64 image: clipped to empty
    num_classes = heads.num_classes
    class_logits = torch.full((5, num_classes), -10.0)
    class_logits[0, 1] = class_logits[1, 1] = 10.0  # two overlapping class-1 boxes: NMS keeps one
    class_logits[2, 2] = 10.0
    class_logits[3, 0] = 10.0  # background
    class_logits[4, 3] = 10.0
    box_deltas = torch.zeros(5, 4 * (num_classes - 1))
    detections = heads.detect_boxes(class_logits, box_deltas, proposals, [(64, 64), (64, 64)])
    first, second = detections
    assert first["labels"].tolist() == [1, 2]
    torch.testing.assert_close(first["boxes"], torch.tensor([[10.0, 10, 30, 30], [40, 40, 60, 60]]))
    assert bool((first["scores"] > 0.99).all())
    assert len(second["boxes"]) == 0 and second["boxes"].shape == (0, 4)


def test_detections_per_image_cuts_and_the_score_threshold_is_strict_at_its_edge():
    """The cap binds (5 detections survive NMS, 3 are kept: the 3 best, best first), and scores
    just above and just below the threshold are kept and dropped."""
    heads = RoIHeads(tiny_config(score_thresh=0.3, nms_thresh=0.5, detections_per_image=3), CHANNELS)
    disjoint = torch.tensor([[0.0, 0, 8, 8], [10, 0, 18, 8], [20, 0, 28, 8], [30, 0, 38, 8], [40, 0, 48, 8]])
    proposals = [disjoint, disjoint[:2]]
    image0_scores = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.95])
    image1_scores = torch.tensor([0.3 + 4e-4, 0.3 - 4e-4])  # either side of score_thresh
    # Logits [0, a, -1e4, ...]: the class-1 score is exactly sigmoid(a); the other classes score 0.
    class_logits = torch.full((7, heads.num_classes), -1e4)
    class_logits[:, 0] = 0.0
    class_logits[:, 1] = torch.logit(torch.cat([image0_scores, image1_scores]).double()).float()
    box_deltas = torch.zeros(7, 4 * (heads.num_classes - 1))
    first, second = heads.detect_boxes(class_logits, box_deltas, proposals, [(64, 64), (64, 64)])
    torch.testing.assert_close(first["scores"], torch.tensor([0.95, 0.9, 0.8]))
    torch.testing.assert_close(first["boxes"], disjoint[[4, 0, 2]])
    assert second["labels"].tolist() == [1]
    torch.testing.assert_close(second["boxes"], disjoint[:1])
    torch.testing.assert_close(second["scores"], image1_scores[:1])


def test_inference_output_shapes_and_types():
    torch.manual_seed(0)
    heads = RoIHeads(tiny_config(score_thresh=0.0), CHANNELS).eval()
    proposals = [random_proposals(30, 5), random_proposals(0, 6)]
    with torch.no_grad():
        detections, losses = heads(pyramid(), proposals, [(IMAGE_SIZE, IMAGE_SIZE)] * 2)
    assert losses == {}
    assert len(detections[0]["boxes"]) > 0 and len(detections[1]["boxes"]) == 0
    for detection in detections:
        count = len(detection["boxes"])
        assert detection["scores"].shape == (count,) and detection["labels"].dtype == torch.int64
        assert detection["mask_probs"].shape == (count, heads.mask_resolution, heads.mask_resolution)
        assert bool(((detection["labels"] >= 1) & (detection["labels"] <= 4)).all())


def two_image_batch():
    """Features, proposals and targets of 2 images, each with foreground."""
    targets = [target([[5, 5, 25, 25], [30, 30, 60, 50]], [1, 3]), target([[8, 30, 40, 60]], [2])]
    return pyramid(), [random_proposals(50, 3), random_proposals(40, 4)], targets


def test_mask_roi_bucket_pads_the_mask_head_batch_and_changes_nothing_else():
    features, proposals, targets = two_image_batch()
    results = {}
    for bucket in (0, 64):
        torch.manual_seed(0)
        heads = RoIHeads(tiny_config(mask_roi_bucket=bucket), CHANNELS)
        seen = []
        heads.mask_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
        leaves = [f.clone().requires_grad_() for f in features]
        torch.manual_seed(1)
        _, losses = heads(leaves, proposals, [(IMAGE_SIZE, IMAGE_SIZE)] * 2, targets)
        sum(losses.values()).backward()
        heads.eval()
        with torch.no_grad():
            detections = heads(features, proposals, [(IMAGE_SIZE, IMAGE_SIZE)] * 2)[0]
        results[bucket] = (losses, [f.grad for f in leaves], [p.grad for p in heads.mask_head.parameters()],
                           detections, seen)
    (losses, grads, head_grads, detections, seen), padded = results[0], results[64]
    assert seen[0] % 64 != 0 and all(count % 64 == 0 for count in padded[4]), (seen, padded[4])
    for name in losses:
        torch.testing.assert_close(padded[0][name], losses[name], rtol=1e-6, atol=1e-7)
    for ours, expected in zip(padded[1] + padded[2], grads + head_grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert sum(len(d["boxes"]) for d in detections) > 0
    for ours, expected in zip(padded[3], detections):
        torch.testing.assert_close(ours["mask_probs"], expected["mask_probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["losses", "losses_per_image"])
def test_classifier_loss_weight_scales_only_the_classifier_loss(path):
    features, proposals, targets = two_image_batch()
    results = {}
    for weight in (1.0, 3.0):
        torch.manual_seed(0)
        heads = RoIHeads(tiny_config(classifier_loss_weight=weight), CHANNELS)
        torch.manual_seed(1)  # the same sampled RoIs for both weights
        results[weight] = getattr(heads, path)(features, proposals, targets)
    plain, weighted = results[1.0], results[3.0]
    torch.testing.assert_close(weighted["loss_classifier"], 3.0 * plain["loss_classifier"])
    for name in ("loss_box", "loss_mask"):
        torch.testing.assert_close(weighted[name], plain[name])
