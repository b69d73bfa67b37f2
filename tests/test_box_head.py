"""Tests for minimrcnn.modeling.box_head: shapes, initialisation, class-specific deltas, losses."""

import numpy as np
import pytest
import torch

from minimrcnn.modeling.box_head import BoxHead, box_head_losses, select_class_deltas


def test_box_head_shapes_and_init():
    torch.manual_seed(0)
    head = BoxHead(in_channels=8, pool_size=7, hidden_dim=32, num_classes=5)
    class_logits, box_deltas = head(torch.randn(6, 8, 7, 7))
    assert class_logits.shape == (6, 5) and box_deltas.shape == (6, 16)
    # Predictors start small (std 0.01 and 0.001) with zero bias.
    assert 0.007 < head.class_logits.weight.std() < 0.013
    assert 0.0007 < head.box_deltas.weight.std() < 0.0013
    assert head.class_logits.bias.abs().max() == 0 and head.box_deltas.bias.abs().max() == 0
    assert head(torch.randn(0, 8, 7, 7))[0].shape == (0, 5)
    with pytest.raises(ValueError, match="num_classes"):
        BoxHead(8, 7, 32, num_classes=1)


def test_select_class_deltas_picks_the_class_columns():
    deltas = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)  # K = 3
    picked = select_class_deltas(deltas, torch.tensor([1, 3]))
    assert picked.tolist() == [[0, 1, 2, 3], [20, 21, 22, 23]]


def reference_losses(class_logits, box_deltas, gt_classes, targets, smooth_beta=None):
    """Float64 loops: mean cross-entropy; sum of |delta - target| over foreground / R."""
    logits = class_logits.detach().double().numpy()
    deltas = box_deltas.detach().double().numpy()
    classes = gt_classes.numpy()
    targets = targets.double().numpy()
    ce, box = 0.0, 0.0
    for r in range(len(classes)):
        row = logits[r]
        ce += np.log(np.exp(row - row.max()).sum()) + row.max() - row[classes[r]]
        if classes[r] > 0:
            for j in range(4):
                diff = abs(deltas[r, 4 * (classes[r] - 1) + j] - targets[r, j])
                if smooth_beta is not None:
                    diff = 0.5 * diff**2 / smooth_beta if diff < smooth_beta else diff - 0.5 * smooth_beta
                box += diff
    return ce / len(classes), box / len(classes)


@pytest.mark.parametrize("box_loss, beta", [("l1", None), ("smooth_l1", 1.0)])
def test_losses_match_float64_reference(box_loss, beta):
    generator = torch.Generator().manual_seed(1)
    class_logits = torch.randn(10, 4, generator=generator)
    box_deltas = torch.randn(10, 12, generator=generator) * 2
    gt_classes = torch.tensor([0, 1, 2, 3, 0, 0, 2, 0, 1, 0])
    targets = torch.randn(10, 4, generator=generator)
    losses = box_head_losses(class_logits, box_deltas, gt_classes, targets, box_loss)
    expected_ce, expected_box = reference_losses(class_logits, box_deltas, gt_classes, targets, beta)
    assert losses["loss_classifier"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_classifier_weight_scales_the_cross_entropy_only():
    generator = torch.Generator().manual_seed(2)
    class_logits = torch.randn(8, 4, generator=generator)
    box_deltas = torch.randn(8, 12, generator=generator)
    gt_classes = torch.tensor([0, 1, 2, 3, 0, 0, 2, 0])
    targets = torch.randn(8, 4, generator=generator)
    expected_ce, expected_box = reference_losses(class_logits, box_deltas, gt_classes, targets)
    weighted = box_head_losses(class_logits, box_deltas, gt_classes, targets, classifier_weight=2.5)
    assert weighted["loss_classifier"].item() == pytest.approx(2.5 * expected_ce, rel=1e-5)
    assert weighted["loss_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_box_loss_touches_only_foreground_ground_truth_class_deltas():
    box_deltas = torch.randn(3, 8, requires_grad=True)  # K = 2
    gt_classes = torch.tensor([0, 2, 1])
    losses = box_head_losses(torch.randn(3, 3), box_deltas, gt_classes, torch.randn(3, 4))
    losses["loss_box"].backward()
    touched = box_deltas.grad != 0
    expected = torch.zeros(3, 8, dtype=torch.bool)
    expected[1, 4:8] = True
    expected[2, 0:4] = True
    assert torch.equal(touched, expected)


def test_losses_without_foreground_or_rois():
    class_logits = torch.randn(4, 3, requires_grad=True)
    box_deltas = torch.randn(4, 8, requires_grad=True)
    losses = box_head_losses(class_logits, box_deltas, torch.zeros(4, dtype=torch.int64),
                             torch.full((4, 4), float("nan")))  # background targets are never read
    assert losses["loss_box"].item() == 0.0
    sum(losses.values()).backward()
    empty = box_head_losses(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 8, requires_grad=True),
                            torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    assert empty["loss_classifier"].item() == 0.0 and empty["loss_box"].item() == 0.0
    with pytest.raises(ValueError, match="box_loss"):
        box_head_losses(class_logits, box_deltas, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4), "l2")
