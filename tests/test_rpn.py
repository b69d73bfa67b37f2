"""RPN: head layout, anchor targets, losses by hand, proposals against a brute-force pipeline, overfitting."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.modeling.backbone import ResNet
from minimrcnn.modeling.fpn import FPN
from minimrcnn.modeling.matcher import Matcher
from minimrcnn.modeling.rpn import (
    RPN,
    RPNHead,
    assign_targets_to_anchors,
    build_rpn,
    find_top_proposals_per_image,
    flatten_deltas,
    flatten_objectness,
    rpn_losses,
    sample_anchors,
)
from minimrcnn.ops.boxes import BoxCoder, box_iou

RPN_MATCHER = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)


def small_rpn(**kwargs) -> RPN:
    settings = dict(anchor_sizes=(8, 16, 32), strides=(4, 8, 16), batch_size_per_image=32,
                    pre_nms_topk=(50, 40), post_nms_topk=(30, 20))
    settings.update(kwargs)
    return RPN(4, **settings)


def random_features(num_images=2, channels=4, image_size=(64, 48), strides=(4, 8, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(num_images, channels, -(-image_size[0] // s), -(-image_size[1] // s), generator=generator)
            for s in strides]


# ---------------------------------------------------------------- layout


def test_head_shapes_and_init():
    torch.manual_seed(0)
    head = RPNHead(8, 3)
    logits, deltas = head([torch.randn(2, 8, 10, 7), torch.randn(2, 8, 5, 4)])
    assert [tuple(t.shape) for t in logits] == [(2, 3, 10, 7), (2, 3, 5, 4)]
    assert [tuple(t.shape) for t in deltas] == [(2, 12, 10, 7), (2, 12, 5, 4)]
    for layer in (head.conv, head.objectness_logits, head.anchor_deltas):
        assert float(layer.bias.detach().abs().max()) == 0
        assert 0.005 < float(layer.weight.detach().std()) < 0.02


def test_flatten_matches_anchor_order():
    # Value encodes (image, anchor, y, x): flattened position must be (y * W + x) * A + a.
    num_images, num_anchors, height, width = 2, 3, 4, 5
    n, a, y, x = torch.meshgrid(*(torch.arange(s) for s in (num_images, num_anchors, height, width)), indexing="ij")
    code = (n * 1000 + a * 100 + y * 10 + x).float()
    flat = flatten_objectness(code)
    expected = np.zeros((num_images, height * width * num_anchors))
    for image in range(num_images):
        for row in range(height):
            for col in range(width):
                for anchor in range(num_anchors):
                    position = (row * width + col) * num_anchors + anchor
                    expected[image, position] = image * 1000 + anchor * 100 + row * 10 + col
    np.testing.assert_array_equal(flat.numpy(), expected)
    # Deltas: channel a * 4 + j holds coordinate j of anchor a.
    deltas = torch.stack([code * 4 + j for j in range(4)], dim=2).reshape(num_images, num_anchors * 4, height, width)
    flat_deltas = flatten_deltas(deltas)
    torch.testing.assert_close(flat_deltas, torch.stack([flat * 4 + j for j in range(4)], dim=2))
    torch.testing.assert_close(flatten_deltas(deltas.contiguous(memory_format=torch.channels_last)), flat_deltas)


# ---------------------------------------------------------------- targets and losses


def test_assign_targets_by_hand():
    anchors = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],   # identical to gt 0: IoU 1 -> positive
        [0.0, 0.0, 10.0, 5.0],    # IoU 0.5 with gt 0 -> ignored
        [0.0, 0.0, 10.0, 2.0],    # IoU 0.2 -> negative
        [50.0, 50.0, 60.0, 60.0], # nothing -> negative
        [20.0, 20.0, 30.0, 25.0], # IoU 0.5 with gt 1, its best anchor -> positive (low quality)
    ])
    gt_boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    labels, matched = assign_targets_to_anchors(anchors, gt_boxes, RPN_MATCHER)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[1, -1, 0, 0, 1], [0, 0, 0, 0, 0]]
    torch.testing.assert_close(matched[0, 0], gt_boxes[0][0])
    torch.testing.assert_close(matched[0, 4], gt_boxes[0][1])
    assert float(matched[1].abs().sum()) == 0


def test_sample_anchors_picks_at_random():
    """Different seeds sample different anchors; over many draws every labelled anchor is drawn."""
    labels = torch.zeros(1, 60, dtype=torch.int64)
    labels[0, :10] = 1
    labels[0, 50:] = -1
    drawn = torch.zeros(60)
    first = None
    for seed in range(100):
        sampled = sample_anchors(labels, 16, 0.25, generator=torch.Generator().manual_seed(seed))[0]
        first = sampled if first is None else first
        drawn += (sampled >= 0).float()
    assert not torch.equal(first, sampled)
    assert bool((drawn[:50] > 0).all()) and bool((drawn[50:] == 0).all())


def test_sample_anchors_balance():
    torch.manual_seed(0)
    labels = torch.zeros(2, 1000, dtype=torch.int64)
    labels[0, :300] = 1
    labels[0, 300:350] = -1
    labels[1, :5] = 1
    sampled = sample_anchors(labels, 64, 0.25)
    assert (sampled[0] == 1).sum() == 16 and (sampled[0] == 0).sum() == 48
    assert (sampled[1] == 1).sum() == 5 and (sampled[1] == 0).sum() == 59
    # Sampled anchors keep their label; ignored anchors are never sampled.
    kept = sampled >= 0
    assert torch.equal(sampled[kept], labels[kept])
    assert (sampled[0, 300:350] == -1).all()


def test_losses_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0], [5.0, 5.0, 9.0, 9.0]])
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.0, -2.0]], requires_grad=True)
    pred_deltas = torch.tensor([[[0.1, -0.2, 0.3, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
                                [[0.0, 0.0, 0.0, 0.0], [0.2, 0.1, -0.1, 0.0], [1.0, 1.0, 1.0, 1.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]])
    matched = torch.tensor([[[1.0, 2.0, 11.0, 12.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                            [[0.0, 0.0, 0.0, 0.0], [12.0, 8.0, 32.0, 24.0], [0.0, 0.0, 0.0, 0.0]]])
    batch_size_per_image = 4
    losses = rpn_losses(logits, pred_deltas, anchors, labels, matched, BoxCoder(), batch_size_per_image)

    def bce(logit, target):
        probability = 1 / (1 + math.exp(-logit))
        return -(target * math.log(probability) + (1 - target) * math.log(1 - probability))

    expected_objectness = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.0, 1) + bce(-2.0, 0)) / (4 * 2)

    def encode(anchor, gt):
        aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
        gw, gh = gt[2] - gt[0], gt[3] - gt[1]
        return [(gt[0] + gw / 2 - anchor[0] - aw / 2) / aw, (gt[1] + gh / 2 - anchor[1] - ah / 2) / ah,
                math.log(gw / aw), math.log(gh / ah)]

    targets = [encode([0, 0, 10, 10], [1, 2, 11, 12]), encode([10, 10, 30, 20], [12, 8, 32, 24])]
    predictions = [[0.1, -0.2, 0.3, 0.0], [0.2, 0.1, -0.1, 0.0]]
    expected_box = sum(abs(p - t) for pred, tgt in zip(predictions, targets) for p, t in zip(pred, tgt)) / (4 * 2)
    assert losses["loss_objectness"].item() == pytest.approx(expected_objectness, rel=1e-5)
    assert losses["loss_rpn_box"].item() == pytest.approx(expected_box, rel=1e-5)

    smooth = rpn_losses(logits, pred_deltas, anchors, labels, matched, BoxCoder(), 4, box_loss="smooth_l1")
    beta = 1 / 9
    expected_smooth = sum(
        0.5 * (p - t) ** 2 / beta if abs(p - t) < beta else abs(p - t) - 0.5 * beta
        for pred, tgt in zip(predictions, targets) for p, t in zip(pred, tgt)
    ) / 8
    assert smooth["loss_rpn_box"].item() == pytest.approx(expected_smooth, rel=1e-5)

    sum(losses.values()).backward()
    assert pred_deltas.grad[0, 1].abs().sum() == 0  # negatives get no box gradient
    assert logits.grad[0, 2] == 0 and logits.grad[1, 0] == 0  # unsampled anchors get none


def test_rpn_on_images_without_objects():
    torch.manual_seed(0)
    rpn = small_rpn().train()
    features = [f.requires_grad_() for f in random_features()]
    proposals, losses = rpn(features, [(64, 48), (60, 40)], [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert set(losses) == {"loss_objectness", "loss_rpn_box"}
    assert losses["loss_rpn_box"].item() == 0
    assert torch.isfinite(losses["loss_objectness"]) and losses["loss_objectness"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in rpn.parameters() if p.grad is not None)
    assert len(proposals) == 2


def test_training_needs_gt_and_eval_gives_no_losses():
    rpn = small_rpn().train()
    with pytest.raises(ValueError, match="gt_boxes"):
        rpn(random_features(), [(64, 48)] * 2)
    with pytest.raises(ValueError, match="image_sizes"):
        rpn(random_features(), [(64, 48)])
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(random_features(), [(64, 48)] * 2)
    assert losses == {}


# ---------------------------------------------------------------- proposals


def test_proposals_shapes_order_clipping():
    torch.manual_seed(0)
    rpn = small_rpn()
    with torch.no_grad():
        for layer in (rpn.head.objectness_logits, rpn.head.anchor_deltas):
            layer.weight.normal_(std=0.5)  # spread the outputs so proposals differ
    image_sizes = [(64, 48), (50, 33)]
    features = random_features()
    for training, topk in ((True, 30), (False, 20)):
        rpn.train(training)
        proposals, logits, _ = rpn(features, image_sizes, [torch.zeros(0, 4)] * 2, return_scores=True)
        for boxes, scores, (height, width) in zip(proposals, logits, image_sizes):
            assert boxes.shape == (topk, 4) and scores.shape == (topk,)
            assert not boxes.requires_grad
            assert torch.all(scores[:-1] >= scores[1:])
            assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= width
            assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= height
            assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])


def brute_force_proposals(anchors_per_level, logits_per_level, deltas_per_level, image_size,
                          pre_nms_topk, post_nms_topk, nms_thresh, min_size):
    """One image, float64 loops: top-k per level, decode, clip, filter, greedy NMS per level, top-k."""
    height, width = image_size
    candidates = []  # (score, level, box)
    for level, (anchors, logits, deltas) in enumerate(zip(anchors_per_level, logits_per_level, deltas_per_level)):
        order = sorted(range(len(logits)), key=lambda i: -logits[i])[:pre_nms_topk]
        for i in order:
            x1, y1, x2, y2 = anchors[i]
            w, h = x2 - x1, y2 - y1
            cx, cy = x1 + w / 2, y1 + h / 2
            dx, dy, dw, dh = deltas[i]
            dw, dh = min(dw, math.log(1000 / 16)), min(dh, math.log(1000 / 16))
            pcx, pcy, pw, ph = cx + dx * w, cy + dy * h, w * math.exp(dw), h * math.exp(dh)
            box = [pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2]
            if not all(math.isfinite(v) for v in box):
                continue
            box = [min(max(box[0], 0), width), min(max(box[1], 0), height),
                   min(max(box[2], 0), width), min(max(box[3], 0), height)]
            if box[2] - box[0] > min_size and box[3] - box[1] > min_size:
                candidates.append((logits[i], level, box))

    def iou(a, b):
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    candidates.sort(key=lambda c: -c[0])
    kept = []
    for score, level, box in candidates:
        if all(other_level != level or iou(box, other_box) <= nms_thresh for _, other_level, other_box in kept):
            kept.append((score, level, box))
    return kept[:post_nms_topk]


@pytest.mark.parametrize("min_size", [0.0, 3.0])
def test_proposals_against_brute_force(min_size):
    generator = torch.Generator().manual_seed(1)
    rpn = small_rpn()
    features = random_features(num_images=2, image_size=(40, 56))
    anchors_per_level = rpn.anchor_generator(features)
    logits_per_level = [torch.randn(2, a.shape[0], generator=generator) * 3 for a in anchors_per_level]
    deltas_per_level = [torch.randn(2, a.shape[0], 4, generator=generator) * 0.5 for a in anchors_per_level]
    deltas_per_level[0][0, :5] = float("nan")  # non-finite boxes are dropped, not returned
    deltas_per_level[1][1, :3, 2] = 50.0  # clamped width: huge box, clipped to the image
    image_sizes = [(40, 56), (33, 50)]
    proposals, logits = find_top_proposals_per_image(
        anchors_per_level, logits_per_level, deltas_per_level, image_sizes, BoxCoder(),
        pre_nms_topk=60, post_nms_topk=45, nms_thresh=0.5, min_box_size=min_size)
    for image in range(2):
        expected = brute_force_proposals(
            [a.double().tolist() for a in anchors_per_level],
            [l[image].double().tolist() for l in logits_per_level],
            [d[image].double().tolist() for d in deltas_per_level],
            image_sizes[image], 60, 45, 0.5, min_size)
        assert len(expected) == len(proposals[image])
        np.testing.assert_allclose(logits[image].numpy(), [c[0] for c in expected], rtol=1e-6)
        np.testing.assert_allclose(proposals[image].numpy(), [c[2] for c in expected], rtol=1e-5, atol=1e-4)
        assert torch.isfinite(proposals[image]).all()


def test_nms_is_per_level():
    # Two identical boxes from different levels both survive; from the same level, one does.
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    logits = [torch.tensor([[3.0, 2.0]]), torch.tensor([[1.0]])]
    deltas = [torch.zeros(1, 2, 4), torch.zeros(1, 1, 4)]
    proposals, scores = find_top_proposals_per_image(anchors, logits, deltas, [(20, 20)], BoxCoder(), 10, 10, 0.7)
    assert scores[0].tolist() == [3.0, 1.0] and proposals[0].shape == (2, 4)


# ---------------------------------------------------------------- building and training


def test_build_rpn_from_config():
    config = get_config("shapes-cpu")
    rpn = build_rpn(config, config.fpn_channels)
    assert rpn.anchor_generator.strides == (4, 8, 16, 32)
    assert rpn.pre_nms_topk == (600, 300) and rpn.post_nms_topk == (200, 100)
    assert rpn.batch_size_per_image == 128 and rpn.box_loss == "l1"
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_rpn(dataclasses.replace(config, fpn_levels=(2, 3, 4, 5, 6)), 64)
    with pytest.raises(ValueError, match="rpn_box_loss"):
        build_rpn(dataclasses.replace(config, rpn_box_loss="l2"), 64)


def synthetic_batch(num_images=2, size=64, seed=0):
    """Dark images with bright axis-aligned rectangles, and their boxes."""
    generator = torch.Generator().manual_seed(seed)
    images, boxes = torch.zeros(num_images, 3, size, size), []
    for image in range(num_images):
        image_boxes = []
        for _ in range(2):
            w, h = torch.randint(10, 30, (2,), generator=generator).tolist()
            x, y = torch.randint(0, size - 30, (2,), generator=generator).tolist()
            images[image, :, y:y + h, x:x + w] = torch.rand(3, 1, 1, generator=generator) + 0.5
            image_boxes.append([x, y, x + w, y + h])
        boxes.append(torch.tensor(image_boxes, dtype=torch.float32))
    return images, boxes


def test_rpn_overfits_a_tiny_batch():
    # Features from a fixed random backbone + FPN (computed once: keeps the test fast);
    # the RPN alone must learn to find the rectangles in them.
    torch.manual_seed(0)
    backbone = ResNet(18, width=8, norm="gn")
    fpn = FPN(backbone.out_channels, out_channels=16, levels=(2, 3, 4))
    rpn = RPN(16, anchor_sizes=(12, 24, 48), strides=(4, 8, 16), batch_size_per_image=64,
              pre_nms_topk=(200, 100), post_nms_topk=(50, 50))
    images, gt_boxes = synthetic_batch()
    with torch.no_grad():
        features = fpn(backbone(images))
    optimizer = torch.optim.Adam(rpn.parameters(), lr=1e-2)
    history = []
    # 40 steps: at 30 the box loss's ratio depends on the sampling draws (0.12-0.31 over seeds).
    for _ in range(40):
        _, losses = rpn(features, [(64, 64)] * 2, gt_boxes)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    for name in ("loss_objectness", "loss_rpn_box"):
        start, end = history[0][name], float(np.mean([h[name] for h in history[-5:]]))
        assert end < 0.3 * start, (name, start, end)
    # The top proposals now overlap every object well.
    rpn.eval()
    with torch.no_grad():
        proposals, _ = rpn(features, [(64, 64)] * 2)
    for boxes, gt in zip(proposals, gt_boxes):
        assert box_iou(gt, boxes[:10]).max(dim=1).values.min() > 0.6


def test_bf16_autocast_keeps_losses_and_proposals_in_float32():
    torch.manual_seed(0)
    rpn = small_rpn().train()
    gt_boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proposals, losses = rpn(random_features(), [(64, 48)] * 2, gt_boxes)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())
    assert all(boxes.dtype == torch.float32 for boxes in proposals)
