"""Tests for the mask branch: heads, the per-class mask loss, mask targets and pasting."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minimrcnn.modeling.mask_head import (
    FCNMaskHead,
    MLPMaskHead,
    mask_loss,
    mask_probabilities,
)
from minimrcnn.modeling.masks import mask_targets_for_image, paste_masks_in_image


@pytest.mark.parametrize("resolution", [28, 14])
def test_fcn_head_output_shape(resolution):
    head = FCNMaskHead(in_channels=8, pool_size=14, resolution=resolution, num_convs=2,
                       hidden_dim=16, num_thing_classes=4)
    assert head(torch.randn(3, 8, 14, 14)).shape == (3, 4, resolution, resolution)
    assert head(torch.randn(0, 8, 14, 14)).shape == (0, 4, resolution, resolution)
    # 28 needs the transposed convolution; 14 has none.
    has_deconv = any(isinstance(m, torch.nn.ConvTranspose2d) for m in head.modules())
    assert has_deconv == (resolution == 28)


def test_mlp_head_shape_and_bad_resolution():
    head = MLPMaskHead(in_channels=4, pool_size=14, resolution=28, hidden_dim=16, num_thing_classes=3)
    assert head(torch.randn(2, 4, 14, 14)).shape == (2, 3, 28, 28)
    with pytest.raises(ValueError, match="resolution"):
        FCNMaskHead(8, 14, 20, 2, 16, 4)


def test_sigmoid_mask_loss_trains_only_the_ground_truth_channel():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 6, 6, generator=generator, requires_grad=True)
    gt_classes = torch.tensor([2, 4, 2])
    targets = (torch.rand(3, 6, 6, generator=generator) > 0.5).float()
    loss = mask_loss(logits, gt_classes, targets, "sigmoid")
    loss.backward()
    for roi, gt_class in enumerate(gt_classes.tolist()):
        for channel in range(4):
            grad = logits.grad[roi, channel]
            if channel == gt_class - 1:
                assert grad.abs().min() > 0
            else:
                assert torch.count_nonzero(grad) == 0  # exactly zero, not just small
    # The value is the mean BCE over the ground-truth channel's pixels (float64 by hand).
    picked = logits.detach().double()[torch.arange(3), gt_classes - 1]
    probs = 1 / (1 + torch.exp(-picked))
    expected = -(targets * torch.log(probs) + (1 - targets) * torch.log(1 - probs)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def softmax_mask_reference(logits, gt_classes, targets):
    """Float64, pixel by pixel: cross-entropy over the K + 1 logits [0, z_1 ... z_K] (the
    background's fixed at 0) with target class c inside the mask and 0 outside, averaged over
    every pixel of every RoI; and the probability of class c at each pixel."""
    logits = logits.double().numpy()
    targets = targets.numpy()
    num_rois, _, height, width = logits.shape
    total, probabilities = 0.0, np.zeros((num_rois, height, width))
    for r in range(num_rois):
        for y in range(height):
            for x in range(width):
                row = np.concatenate([[0.0], logits[r, :, y, x]])
                log_normalizer = np.log(np.sum(np.exp(row)))
                target = gt_classes[r] if targets[r, y, x] > 0.5 else 0
                total += log_normalizer - row[target]
                probabilities[r, y, x] = np.exp(row[gt_classes[r]] - log_normalizer)
    return total / (num_rois * height * width), probabilities


@pytest.mark.parametrize("num_classes", [2, 4])
def test_softmax_mask_loss_value_matches_a_float64_reference(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    logits = 3 * torch.randn(3, num_classes, 6, 6, generator=generator)
    gt_classes = torch.randint(1, num_classes + 1, (3,), generator=generator)
    gt_classes[0] = num_classes  # the last channel is used too
    targets = (torch.rand(3, 6, 6, generator=generator) > 0.5).float()
    expected, _ = softmax_mask_reference(logits, gt_classes.tolist(), targets)
    loss = mask_loss(logits, gt_classes, targets, "softmax")
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)


def test_softmax_mask_loss_couples_classes_and_equals_sigmoid_for_one_class():
    generator = torch.Generator().manual_seed(1)
    targets = (torch.rand(2, 5, 5, generator=generator) > 0.5).float()
    one_class = torch.randn(2, 1, 5, 5, generator=generator)
    classes = torch.tensor([1, 1])
    torch.testing.assert_close(mask_loss(one_class, classes, targets, "softmax"),
                               mask_loss(one_class, classes, targets, "sigmoid"))
    logits = torch.randn(2, 3, 5, 5, generator=generator, requires_grad=True)
    mask_loss(logits, torch.tensor([1, 3]), targets, "softmax").backward()
    assert torch.count_nonzero(logits.grad[0, 1]) > 0  # other classes compete for the pixels
    probs = mask_probabilities(logits.detach(), torch.tensor([1, 3]), "softmax")
    assert probs.shape == (2, 5, 5)
    _, expected_probs = softmax_mask_reference(logits.detach(), [1, 3], targets)
    np.testing.assert_allclose(probs.numpy(), expected_probs, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="mask_loss"):
        mask_loss(logits, torch.tensor([1, 3]), targets, "hinge")


def test_mask_loss_and_probabilities_with_no_rois():
    logits = torch.zeros(0, 3, 28, 28, requires_grad=True)
    loss = mask_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    loss.backward()
    assert loss.item() == 0.0
    assert mask_probabilities(logits.detach(), torch.zeros(0, dtype=torch.int64)).shape == (0, 28, 28)


def test_mask_probabilities_reads_the_predicted_class():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1] = 5.0
    logits[1, 2] = -5.0
    probs = mask_probabilities(logits, torch.tensor([2, 3]))
    torch.testing.assert_close(probs[0], torch.full((4, 4), torch.sigmoid(torch.tensor(5.0)).item()))
    torch.testing.assert_close(probs[1], torch.full((4, 4), torch.sigmoid(torch.tensor(-5.0)).item()))


# ---- targets ----


def test_full_box_mask_gives_all_ones_target():
    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[1, 4:20, 6:30] = 1  # pixels 6..29 x 4..19: exactly the box [6, 4, 30, 20]
    targets = mask_targets_for_image(masks, torch.tensor([[6.0, 4, 30, 20]]), torch.tensor([1]), 28)
    assert targets.shape == (1, 28, 28) and targets.dtype == torch.float32
    assert targets.min() == 1.0
    # The same box on the empty mask 0 gives all zeros.
    assert mask_targets_for_image(masks, torch.tensor([[6.0, 4, 30, 20]]), torch.tensor([0]), 28).max() == 0


def test_half_box_mask_gives_right_half_target():
    masks = torch.zeros(1, 40, 40, dtype=torch.bool)
    masks[0, 4:20, 12:20] = True  # right half of the box [4, 4, 20, 20]
    targets = mask_targets_for_image(masks, torch.tensor([[4.0, 4, 20, 20]]), torch.tensor([0]), 28)
    expected = torch.zeros(28, 28)
    expected[:, 14:] = 1
    assert torch.equal(targets[0], expected)


def test_targets_follow_the_box_scale():
    # Masks at original resolution, proposals in an image resized by 2: same targets.
    masks = torch.zeros(1, 40, 40, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1
    at_scale_1 = mask_targets_for_image(masks, torch.tensor([[2.0, 8, 27, 31]]), torch.tensor([0]), 14)
    at_scale_2 = mask_targets_for_image(masks, torch.tensor([[4.0, 16, 54, 62]]), torch.tensor([0]), 14,
                                        box_scale=(2.0, 2.0))
    assert torch.equal(at_scale_1, at_scale_2)
    assert mask_targets_for_image(masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 14).shape == (0, 14, 14)


# ---- paste ----


def reference_paste(mask_probs, boxes, height, width, threshold):
    """Float64 brute force over every pixel of the image (Detectron2's full-image paste)."""
    mask_probs = mask_probs.double().numpy()
    out = np.zeros((len(boxes), height, width), dtype=bool)
    for d, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        m = mask_probs[d]
        size = m.shape[0]
        for i in range(height):
            for j in range(width):
                # Position in mask pixels (align_corners=False): centre of cell c is c + 0.5.
                u = (j + 0.5 - x0) / (x1 - x0) * size - 0.5
                v = (i + 0.5 - y0) / (y1 - y0) * size - 0.5
                u0, v0 = int(np.floor(u)), int(np.floor(v))
                value = 0.0
                for dv in (0, 1):
                    for du in (0, 1):
                        uu, vv = u0 + du, v0 + dv
                        if 0 <= uu < size and 0 <= vv < size:
                            value += m[vv, uu] * (1 - abs(u - uu)) * (1 - abs(v - vv))
                out[d, i, j] = value >= threshold
    return torch.from_numpy(out)


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_paste_matches_full_image_reference(threshold):
    generator = torch.Generator().manual_seed(3)
    mask_probs = torch.rand(4, 7, 7, generator=generator)
    boxes = torch.tensor([[3.3, 2.1, 20.7, 15.2], [-4.0, 10.0, 12.5, 30.0], [25.0, 18.2, 36.9, 27.0],
                          [5.0, 5.0, 6.0, 5.5]])
    pasted = paste_masks_in_image(mask_probs, boxes, (26, 32), threshold)
    expected = reference_paste(mask_probs, boxes, 26, 32, threshold)
    assert pasted.dtype == torch.bool and pasted.shape == (4, 26, 32)
    assert torch.equal(pasted, expected)


def test_pasted_box_mask_covers_the_box_within_half_a_pixel():
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0], [10.3, 3.7, 30.4, 17.2]])
    pasted = paste_masks_in_image(torch.ones(2, 28, 28), boxes, (40, 40))
    for mask, (x0, y0, x1, y1) in zip(pasted, boxes.tolist()):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        # The pixels whose centre lies in the box: the pasted region's edges
        # (left of the first pixel, right of the last) are within half a pixel of the box's.
        assert abs(cols.min().item() - x0) <= 0.5 and abs(cols.max().item() + 1 - x1) <= 0.5
        assert abs(rows.min().item() - y0) <= 0.5 and abs(rows.max().item() + 1 - y1) <= 0.5
        assert mask.sum() == (cols.max() - cols.min() + 1) * (rows.max() - rows.min() + 1)


def test_target_then_paste_round_trip_recovers_the_mask():
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    masks[0] = ((yy - 30.0) ** 2 + (xx - 28.0) ** 2 <= 15.0**2).to(torch.uint8)  # a disc
    box = torch.tensor([[13.0, 15.0, 44.0, 46.0]])
    target = mask_targets_for_image(masks, box, torch.tensor([0]), 28)
    pasted = paste_masks_in_image(target, box, (64, 64))
    intersection = (pasted[0] & masks[0].bool()).sum()
    union = (pasted[0] | masks[0].bool()).sum()
    assert intersection / union > 0.95


def test_paste_with_no_detections_and_bad_boxes():
    assert paste_masks_in_image(torch.zeros(0, 28, 28), torch.zeros(0, 4), (10, 12)).shape == (0, 10, 12)
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(torch.zeros(2, 28, 28), torch.zeros(3, 4), (10, 12))
