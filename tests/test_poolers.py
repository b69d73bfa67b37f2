"""Tests for minimrcnn.modeling.poolers: FPN level assignment and multi-scale pooling."""

import math

import pytest
import torch

from minimrcnn.modeling.poolers import (
    MultiScaleRoIPooler,
    assign_boxes_to_levels,
    usable_levels,
)
from minimrcnn.ops.roi_align import roi_align
from minimrcnn.ops.roi_pool import roi_pool


def square(size, x=0.0, y=0.0):
    return [x, y, x + size, y + size]


@pytest.mark.parametrize(
    "size, expected",
    [
        (224, 4),  # the canonical size lands on k0
        (223.9, 3),  # floor, not round
        (112, 3),  # exactly half: log2(0.5) = -1 (the 1e-8 must not push it below)
        (448, 5),
        (447, 4),
        (56, 2),
        (10, 2),  # clamped from below
        (2000, 5),  # clamped from above
        (0, 2),  # empty box: log2(1e-8) is very negative -> lowest level
    ],
)
def test_level_assignment_matches_hand_values(size, expected):
    boxes = torch.tensor([square(size, 5.0, 7.0)])
    assert assign_boxes_to_levels(boxes, 2, 5, 4, 224).tolist() == [expected]


def test_level_assignment_formula_on_rectangles():
    # sqrt(w h) decides, not the longer side: 448 x 112 has sqrt = 224 -> level 4.
    boxes = torch.tensor([[0.0, 0, 448, 112], [0, 0, 50, 200], [0, 0, 30, 30]])
    levels = assign_boxes_to_levels(boxes, 2, 5, canonical_level=4, canonical_size=56)
    expected = [
        min(max(math.floor(4 + math.log2(math.sqrt(w * h) / 56 + 1e-8)), 2), 5)
        for w, h in [(448, 112), (50, 200), (30, 30)]
    ]
    assert levels.tolist() == expected == [5, 4, 3]
    assert levels.dtype == torch.int64


def test_usable_levels_drop_p6_and_reject_nonsense():
    assert usable_levels((2, 3, 4, 5, 6)) == (2, 3, 4, 5)
    assert usable_levels((3, 4)) == (3, 4)
    with pytest.raises(ValueError, match="feature_levels"):
        usable_levels((6, 7))


def random_pyramid(levels, num_images=2, channels=3, image_size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_images, channels, image_size // 2**level, image_size // 2**level,
                    generator=generator, dtype=torch.float64)
        for level in levels
    ]


def test_pooler_pools_each_roi_from_its_own_level():
    levels = (2, 3, 4, 5, 6)
    features = random_pyramid(levels)
    rois = torch.tensor(
        [[0, 1.0, 2, 9, 8], [1, 3, 3, 60, 62], [0, 10, 4, 40, 30], [1, 0, 0, 20, 16], [0, 5, 5, 5, 5]],
        dtype=torch.float64,
    )
    pooler = MultiScaleRoIPooler(7, levels, "align", sampling_ratio=2, canonical_level=4,
                                 canonical_size=32)
    pooled = pooler(features, rois)
    assert pooled.shape == (5, 3, 7, 7)
    for row, roi in enumerate(rois):
        width, height = float(roi[3] - roi[1]), float(roi[4] - roi[2])
        level = math.floor(4 + math.log2(math.sqrt(width * height) / 32 + 1e-8))
        level = min(max(level, 2), 5)  # P6 never carries RoIs
        expected = roi_align(features[levels.index(level)], roi[None], 7, spatial_scale=1 / 2**level,
                             sampling_ratio=2, aligned=True)
        torch.testing.assert_close(pooled[row : row + 1], expected)


def test_pooler_roipool_and_gradients():
    levels = (2, 3)
    features = [f.requires_grad_() for f in random_pyramid(levels)]
    rois = torch.tensor([[0, 1.0, 2, 9, 8], [1, 3, 3, 60, 62]], dtype=torch.float64)
    pooler = MultiScaleRoIPooler(4, levels, "pool", canonical_level=4, canonical_size=224)
    pooled = pooler(features, rois)
    # Both boxes are far below 224 pixels: level 2 for all.
    expected = roi_pool(features[0], rois, 4, spatial_scale=0.25)
    torch.testing.assert_close(pooled, expected)
    pooled.sum().backward()
    assert features[0].grad.abs().sum() > 0
    assert features[1].grad is None or features[1].grad.abs().sum() == 0


def test_pooler_empty_rois_and_bad_arguments():
    features = random_pyramid((2, 3, 4, 5))
    pooler = MultiScaleRoIPooler(7, (2, 3, 4, 5))
    assert pooler(features, torch.zeros(0, 5, dtype=torch.float64)).shape == (0, 3, 7, 7)
    with pytest.raises(ValueError, match="features"):
        pooler(features[:3], torch.zeros(1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="rois"):
        pooler(features, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="roi_op"):
        MultiScaleRoIPooler(7, (2, 3), roi_op="bilinear")  # "warp" is an ablation op now
