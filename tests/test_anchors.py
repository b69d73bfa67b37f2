import math

import pytest
import torch

from minimrcnn.modeling.anchors import AnchorGenerator, cell_anchors


def test_cell_anchors_keep_area_and_ratio():
    anchors = cell_anchors(32, (0.5, 1.0, 2.0))
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    assert torch.allclose(widths * heights, torch.full((3,), 32.0 * 32))
    assert torch.allclose(heights / widths, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.allclose(anchors[:, :2] + anchors[:, 2:], torch.zeros(3, 2))  # centred on 0
    assert widths[0].item() == pytest.approx(math.sqrt(32 * 32 / 0.5))  # not rounded


def test_counts_shapes_and_centres():
    generator = AnchorGenerator(sizes=(16, 32), aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8))
    features = [torch.zeros(2, 3, 5, 7), torch.zeros(2, 3, 3, 4)]
    per_level = generator(features)
    assert [a.shape for a in per_level] == [(5 * 7 * 3, 4), (3 * 4 * 3, 4)]
    for anchors, (height, width), stride in zip(per_level, [(5, 7), (3, 4)], (4, 8)):
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        centres = centres.reshape(height, width, 3, 2)
        for y in range(height):
            for x in range(width):
                assert torch.allclose(centres[y, x], torch.tensor([(x + 0.5) * stride, (y + 0.5) * stride]))


def test_offset_zero_and_bad_config():
    generator = AnchorGenerator(sizes=(8,), aspect_ratios=(1.0,), strides=(4,), offset=0.0)
    anchors = generator([torch.zeros(1, 1, 2, 2)])[0]
    assert torch.equal(anchors, torch.tensor([[-4.0, -4, 4, 4], [0, -4, 8, 4], [-4, 0, 4, 8], [0, 0, 8, 8]]))
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(sizes=(8, 16), strides=(4,))
    with pytest.raises(ValueError, match="feature levels"):
        generator([torch.zeros(1, 1, 2, 2)] * 2)
