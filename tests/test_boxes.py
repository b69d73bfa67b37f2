"""Box ops against brute-force float64 loops and hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from minimrcnn.ops.boxes import (
    DEFAULT_SCALE_CLAMP,
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    nms,
    remove_small_boxes,
)


def random_boxes(num, size=100.0, seed=0, integer=False):
    rng = np.random.default_rng(seed)
    top_left = rng.uniform(0, size, (num, 2))
    wh = rng.uniform(1, size / 2, (num, 2))
    boxes = np.concatenate([top_left, top_left + wh], axis=1)
    if integer:  # coarse coordinates make exact ties and duplicates likely
        boxes = np.round(boxes / 10) * 10 + np.array([0, 0, 5, 5])
    return torch.tensor(boxes, dtype=torch.float32)


def iou_loop(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.zeros((len(a), len(b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            inter = iw * ih
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def nms_loop(boxes, scores, classes, threshold):
    """Greedy NMS written as plainly as possible: the spec."""
    boxes = np.asarray(boxes, np.float64)
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # stable for ties
    kept = []
    for i in order:
        if all(classes[k] != classes[i] or iou_loop(boxes[[k]], boxes[[i]])[0, 0] <= threshold
               for k in kept):
            kept.append(i)
    return kept


def test_box_iou_matches_loop():
    a, b = random_boxes(30, seed=1), random_boxes(20, seed=2)
    np.testing.assert_allclose(box_iou(a, b).numpy(), iou_loop(a, b), rtol=1e-5, atol=1e-6)


def test_box_iou_hand_cases():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [2.0, 2, 4, 4], [0.0, 0, 2, 2], [5.0, 5, 5, 5]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0, 0.0]]))
    degenerate = torch.tensor([[1.0, 1, 1, 1]])
    assert box_iou(degenerate, degenerate).item() == 0.0
    assert box_iou(torch.zeros(0, 4), b).shape == (0, 4)


def test_box_area_clip_and_small():
    boxes = torch.tensor([[-5.0, 2, 10, 30], [1.0, 1, 1.5, 9]])
    assert torch.equal(box_area(boxes), torch.tensor([15.0 * 28, 0.5 * 8]))
    assert torch.equal(clip_boxes(boxes, (20, 8)), torch.tensor([[0.0, 2, 8, 20], [1.0, 1, 1.5, 9]]))
    assert remove_small_boxes(boxes, 1.0).tolist() == [0]
    assert remove_small_boxes(boxes, 0.5).tolist() == [0, 1]


def test_bad_box_input_names_argument():
    with pytest.raises(ValueError, match="boxes_b"):
        box_iou(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(TypeError, match="boxes"):
        box_area(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scores"):
        nms(torch.zeros(2, 4), torch.zeros(3), 0.5)


def test_box_coder_round_trip_and_formula():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = random_boxes(40, seed=3).double()
    gt = random_boxes(40, seed=4).double()
    deltas = coder.encode(proposals, gt)
    assert torch.allclose(coder.decode(deltas, proposals), gt, atol=1e-9)
    # hand case: proposal 10x20 centred (5, 10); gt 20x20 centred (7, 10)
    d = coder.encode(torch.tensor([[0.0, 0, 10, 20]]), torch.tensor([[-3.0, 0, 17, 20]]))
    assert torch.allclose(d, torch.tensor([[10 * 2 / 10, 0.0, 5 * math.log(2), 0.0]]))


def test_box_coder_clamps_scale_from_above_only():
    coder = BoxCoder()
    proposal = torch.tensor([[0.0, 0, 16, 16]])
    huge = coder.decode(torch.tensor([[0.0, 0, 50.0, -50.0]]), proposal)
    width = (huge[0, 2] - huge[0, 0]).item()
    height = (huge[0, 3] - huge[0, 1]).item()
    assert width == pytest.approx(16 * math.exp(DEFAULT_SCALE_CLAMP), rel=1e-5)  # 1000 px
    assert height == pytest.approx(16 * math.exp(-50.0), rel=1e-4)  # no lower clamp


def test_box_coder_class_specific_layout():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = random_boxes(5, seed=5)
    deltas = torch.randn(5, 12)
    boxes = coder.decode(deltas, proposals)
    assert boxes.shape == (5, 12)
    for k in range(3):
        assert torch.allclose(boxes[:, 4 * k:4 * k + 4], coder.decode(deltas[:, 4 * k:4 * k + 4], proposals))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_brute_force_with_ties(seed, threshold):
    boxes = random_boxes(60, seed=seed, integer=True)
    scores = torch.tensor(np.random.default_rng(seed).integers(0, 5, 60), dtype=torch.float32)
    expected = nms_loop(boxes, scores.numpy(), np.zeros(60), threshold)
    assert nms(boxes, scores, threshold).tolist() == expected


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(80, seed=seed + 10, integer=seed % 2 == 0)
    scores = torch.tensor(rng.random(80), dtype=torch.float32)
    classes = torch.tensor(rng.integers(0, 4, 80))
    expected = nms_loop(boxes, scores.numpy(), classes.numpy(), 0.5)
    kept = batched_nms(boxes, scores, classes, 0.5)
    assert kept.tolist() == expected
    assert torch.all(scores[kept][:-1] >= scores[kept][1:])


def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    same = torch.tensor([[0.0, 0, 10, 10]] * 3)
    assert nms(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    # IoU exactly at the threshold is kept (suppression needs IoU > threshold)
    pair = torch.tensor([[0.0, 0, 2, 1], [1.0, 0, 3, 1]])  # IoU 1/3
    assert nms(pair, torch.tensor([1.0, 0.5]), 1 / 3).tolist() == [0, 1]
    degenerate = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1]])
    assert nms(degenerate, torch.tensor([1.0, 0.5]), 0.5).tolist() == [0, 1]


def test_max_kept_equals_slicing():
    boxes = random_boxes(200, seed=7)
    scores = torch.rand(200, generator=torch.Generator().manual_seed(7))
    classes = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(8))
    full = batched_nms(boxes, scores, classes, 0.5)
    for limit in (0, 1, 5, len(full), len(full) + 10):
        assert batched_nms(boxes, scores, classes, 0.5, max_kept=limit).tolist() == full[:limit].tolist()
