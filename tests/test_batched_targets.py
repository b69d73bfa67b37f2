"""The batched training targets (modeling.batched) against the per-image functions they replace."""

import dataclasses

import pytest
import torch

from minimrcnn import get_config
from minimrcnn.modeling import batched
from minimrcnn.modeling.masks import mask_targets_for_image
from minimrcnn.modeling.matcher import Matcher
from minimrcnn.modeling.model import training_targets
from minimrcnn.modeling.roi_heads import RoIHeads
from minimrcnn.modeling.rpn import (assign_targets_to_anchors, find_top_proposals_per_image, rpn_losses)
from minimrcnn.ops.boxes import BoxCoder, batched_nms, nms_padded

RPN_MATCHER = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)
ROI_MATCHER = Matcher([0.5], [0, 1], allow_low_quality_matches=False)
SIZE = 64


def random_boxes(count, generator, size=SIZE, min_side=2.0):
    corners = torch.rand(count, 2, generator=generator) * (size - 20)
    sides = torch.rand(count, 2, generator=generator) * 18 + min_side
    return torch.cat([corners, corners + sides], dim=1)


def random_targets(counts, generator, with_crowd_and_empty=True):
    targets = []
    for count in counts:
        boxes = random_boxes(count, generator)
        masks = torch.zeros(count, SIZE, SIZE, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.floor().int().tolist()):
            mask[y0:y1 + 1, x0:x1 + 1] = 1
        iscrowd = torch.zeros(count, dtype=torch.int64)
        if with_crowd_and_empty and count >= 3:
            iscrowd[1] = 1
            boxes[2, 2] = boxes[2, 0]  # zero width
        targets.append({"boxes": boxes, "labels": torch.randint(1, 5, (count,), generator=generator),
                        "masks": masks, "iscrowd": iscrowd})
    return targets


def test_pad_ground_truth_marks_what_training_targets_drops():
    generator = torch.Generator().manual_seed(0)
    targets = random_targets([4, 0, 3, 1], generator)
    scales = [(1.5, 2.0), (1.0, 1.0), (0.5, 0.75), (2.0, 2.0)]
    ground_truth = batched.pad_ground_truth(targets, scales)
    prepared = training_targets(targets, scales)
    assert ground_truth.boxes.shape == (4, 4, 4)
    for index, target in enumerate(prepared):
        valid = ground_truth.valid[index]
        torch.testing.assert_close(ground_truth.boxes[index][valid], target["boxes"], rtol=0, atol=0)
        assert torch.equal(ground_truth.labels[index][valid], target["labels"])
    assert ground_truth.valid.tolist()[0] == [True, False, False, True]
    assert not ground_truth.valid[1].any()


@pytest.mark.parametrize("matcher", [RPN_MATCHER, ROI_MATCHER])
def test_match_batched_equals_the_matcher_per_image(matcher):
    generator = torch.Generator().manual_seed(1)
    counts = [5, 0, 2, 7]
    predictions = [random_boxes(300, generator) for _ in counts]
    gt = [random_boxes(count, generator) for count in counts]
    # Ties: a prediction that equals a ground truth twice over.
    predictions[0][:2] = gt[0][0]
    ground_truth = batched.ground_truth_from_boxes(gt)
    iou = batched.box_iou_batched(ground_truth.boxes, torch.stack(predictions))
    matched, label = batched.match_batched(matcher, iou, ground_truth.valid)
    from minimrcnn.ops.boxes import box_iou
    for index, (image_gt, image_predictions) in enumerate(zip(gt, predictions)):
        image_iou = box_iou(image_gt, image_predictions)
        torch.testing.assert_close(iou[index, : len(image_gt)], image_iou, rtol=0, atol=0)
        expected_matched, expected_label = matcher(image_iou)
        assert torch.equal(label[index], expected_label)
        assert torch.equal(matched[index], expected_matched)


def test_assign_anchors_batched_equals_per_image():
    generator = torch.Generator().manual_seed(2)
    anchors = random_boxes(500, generator)
    gt = [random_boxes(count, generator) for count in (3, 0, 6)]
    labels, matched = assign_targets_to_anchors(anchors, gt, RPN_MATCHER)
    batch_labels, batch_matched = batched.assign_anchors_batched(
        anchors, batched.ground_truth_from_boxes(gt), RPN_MATCHER)
    assert torch.equal(batch_labels, labels)
    assert torch.equal(batch_matched, matched)


def test_subsample_batched_quotas_and_uniformity():
    labels = torch.zeros(3, 200, dtype=torch.int64)
    labels[0, :100] = 1
    labels[0, 100:120] = -1
    labels[1, :3] = 2  # any label other than background and -1 is foreground
    labels[2] = -1
    labels[2, :10] = 0
    generator = torch.Generator().manual_seed(3)
    hits = torch.zeros(200)
    for _ in range(400):
        pi, pt, ni, nt = batched.subsample_batched(labels, 32, 0.25, 0, generator)
        positives = [set(pi[n][pt[n]].tolist()) for n in range(3)]
        negatives = [set(ni[n][nt[n]].tolist()) for n in range(3)]
        assert [len(p) for p in positives] == [8, 3, 0]
        assert [len(n) for n in negatives] == [24, 29, 10]
        for n in range(3):
            assert all(labels[n, i] not in (0, -1) for i in positives[n])
            assert all(labels[n, i] == 0 for i in negatives[n])
        hits[list(positives[0])] += 1
    # Each of the 100 positives of image 0 is drawn with probability 8/100: 32 of 400 draws.
    frequencies = hits[:100] / 400
    assert abs(float(frequencies.mean()) - 0.08) < 1e-6
    assert float((frequencies - 0.08).abs().max()) < 0.06  # about 4 standard deviations


def test_nms_padded_equals_batched_nms_per_row():
    generator = torch.Generator().manual_seed(4)
    boxes = random_boxes(3 * 120, generator).reshape(3, 120, 4)
    scores = torch.rand(3, 120, generator=generator)
    scores[0, 10:20] = 0.5  # ties keep input order
    classes = torch.randint(0, 3, (3, 120), generator=generator)
    valid = torch.rand(3, 120, generator=generator) > 0.2
    valid[2] = False
    kept, counts = nms_padded(boxes, scores, classes, valid, 0.5, 40)
    for row in range(3):
        positions = torch.nonzero(valid[row]).flatten()
        expected = positions[batched_nms(boxes[row][positions], scores[row][positions],
                                         classes[row][positions], 0.5, max_kept=40)]
        assert counts[row] == len(expected)
        assert torch.equal(kept[row, : counts[row]], expected)
    assert counts[2] == 0


def test_find_top_proposals_batched_equals_per_image():
    generator = torch.Generator().manual_seed(5)
    anchors = [random_boxes(count, generator) for count in (400, 100, 30)]
    objectness = [torch.randn(2, len(a), generator=generator) for a in anchors]
    deltas = [torch.randn(2, len(a), 4, generator=generator) * 0.3 for a in anchors]
    objectness[0][0, :5] = float("nan")  # non-finite candidates are dropped
    deltas[1][1, :3, 2] = -20.0  # tiny boxes, removed by min_box_size
    args = (anchors, objectness, deltas, [(SIZE, SIZE), (50, 40)], BoxCoder(), 120, 60, 0.7, 0.5)
    expected_boxes, expected_logits = find_top_proposals_per_image(*args)
    got_boxes, got_logits = batched.find_top_proposals_batched(*args)
    for expected, got in zip(expected_boxes + expected_logits, got_boxes + got_logits):
        assert torch.equal(expected, got)


def test_rpn_losses_masked_equal_rpn_losses():
    generator = torch.Generator().manual_seed(6)
    anchors = random_boxes(200, generator)
    gt = [random_boxes(4, generator), random_boxes(0, generator)]
    labels, matched = assign_targets_to_anchors(anchors, gt, RPN_MATCHER)
    sampled = batched.sample_anchors_batched(labels, 64, 0.5, generator)
    logits = torch.randn(2, 200, generator=generator, dtype=torch.float64, requires_grad=True)
    deltas = torch.randn(2, 200, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    for box_loss in ("l1", "smooth_l1"):
        expected = rpn_losses(logits, deltas, anchors.double(), sampled, matched.double(), BoxCoder(), 64, box_loss)
        got = batched.rpn_losses_masked(logits, deltas, anchors.double(), sampled, matched.double(), BoxCoder(),
                                        64, box_loss)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name])
            expected_grad = torch.autograd.grad(expected[name], (logits, deltas), allow_unused=True,
                                                materialize_grads=True)
            got_grad = torch.autograd.grad(got[name], (logits, deltas), allow_unused=True, materialize_grads=True)
            for e, g in zip(expected_grad, got_grad):
                torch.testing.assert_close(g, e)


def test_mask_targets_batched_equal_per_image():
    generator = torch.Generator().manual_seed(7)
    targets = random_targets([3, 2], generator, with_crowd_and_empty=False)
    scales = [(1.5, 1.5), (0.75, 1.0)]
    ground_truth = batched.pad_ground_truth(targets, scales)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])
    matched = torch.tensor([0, 2, 2, 1, 0, 1])
    boxes = random_boxes(6, generator, size=80)
    got = batched.mask_targets_batched(ground_truth, image_index, boxes, matched, 14)
    expected = torch.cat([
        mask_targets_for_image(targets[n]["masks"], boxes[image_index == n], matched[image_index == n], 14, scales[n])
        for n in range(2)])
    assert torch.equal(got, expected)


def test_mask_targets_batched_equal_per_image_when_mask_sizes_differ():
    """Images of other sizes: each image's masks are their own map (roi_align_levels)."""
    generator = torch.Generator().manual_seed(11)
    targets = random_targets([3, 2, 0, 2], generator, with_crowd_and_empty=False)
    targets[1]["masks"] = targets[1]["masks"][:, : SIZE // 2, : SIZE - 7].contiguous()  # H, W differ
    targets[3]["masks"] = targets[3]["masks"][:, 5:, :].contiguous()
    scales = [(1.5, 1.5), (0.75, 1.0), (1.0, 1.0), (1.25, 0.5)]
    ground_truth = batched.pad_ground_truth(targets, scales)
    image_index = torch.tensor([0, 0, 1, 1, 1, 3, 3])
    matched = torch.tensor([2, 0, 1, 0, 1, 1, 0])
    boxes = random_boxes(7, generator, size=80)
    got = batched.mask_targets_batched(ground_truth, image_index, boxes, matched, 12)
    expected = torch.cat([
        mask_targets_for_image(targets[n]["masks"], boxes[image_index == n], matched[image_index == n], 12, scales[n])
        for n in (0, 1, 3)])
    assert got.shape == (7, 12, 12) and got.sum() > 0
    assert torch.equal(got, expected)


def test_roi_losses_batched_equal_per_image_when_sampling_takes_everything():
    """With a sample size above every candidate count both samplers take all candidates,
    so the batched losses must equal the per-image ones (up to summation order)."""
    config = dataclasses.replace(
        get_config("shapes-cpu"), fpn_channels=8, box_head_dim=16, mask_head_dim=8,
        roi_batch_size_per_image=4096, roi_positive_fraction=1.0)
    torch.manual_seed(0)
    heads = RoIHeads(config, 8).double()
    generator = torch.Generator().manual_seed(8)
    features = [torch.randn(2, 8, SIZE // 2**level, SIZE // 2**level, generator=generator, dtype=torch.float64)
                for level in (2, 3, 4, 5)]
    targets = random_targets([3, 2], generator, with_crowd_and_empty=False)
    for target in targets:
        target["boxes"] = target["boxes"].double()
        target.pop("iscrowd")
    proposals = [random_boxes(40, generator).double(), random_boxes(25, generator).double()]
    proposals[0][:3] = targets[0]["boxes"][:1] + 0.5  # some foreground
    expected = heads.losses_per_image(features, proposals, targets)
    got = heads.losses(features, proposals, targets)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    assert float(expected["loss_mask"]) > 0
