"""evaluation.recall.recall_at_iou and the drawing helpers moved out of the notebooks."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minimrcnn.evaluation.recall import recall_at_iou  # noqa: E402
from minimrcnn.ops.roi_pool import roi_pool_bins  # noqa: E402
from minimrcnn.viz import draw_boxes, draw_roi_pool_vs_align  # noqa: E402


def test_recall_at_iou_by_hand():
    objects = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 4, 4]])]
    proposals = [torch.tensor([[0.0, 0, 10, 8], [50, 50, 60, 60]]),  # IoU 0.8 with object 0, 0 with object 1
                 torch.tensor([[0.0, 0, 4, 2]])]  # IoU 0.5 exactly
    assert recall_at_iou(proposals, objects, (0.5, 0.7, 0.9)) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert recall_at_iou([torch.zeros(0, 4)], [torch.tensor([[0.0, 0, 1, 1]])]) == [0.0, 0.0]
    assert recall_at_iou([torch.zeros(0, 4)], [torch.zeros(0, 4)]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="images"):
        recall_at_iou([torch.zeros(0, 4)], [])


def test_draw_boxes_and_the_roi_picture():
    figure, (ax, ax_pool, ax_align) = plt.subplots(1, 3)
    rectangles = draw_boxes(ax, torch.tensor([[1.0, 2, 5, 7], [0, 0, 3, 3]]), colours="red")
    assert [r.get_xy() for r in rectangles] == [(1.0, 2.0), (0.0, 0.0)]
    assert rectangles[0].get_width() == 4 and rectangles[0].get_height() == 5
    with pytest.raises(ValueError, match="one per box"):
        draw_boxes(ax, np.zeros((2, 4)), colours=["red"] * 3)
    roi = [0, 2.3, 1.6, 6.8, 5.2]
    artists = draw_roi_pool_vs_align(ax_pool, ax_align, np.arange(80.0).reshape(8, 10), roi, (2, 2), 2)
    dashed = [p for p in ax_pool.patches if p.get_linestyle() == "--"]
    assert len(dashed) == 4  # one per RoIPool bin, at the bins' edges
    (_, _, r0, r1, c0, c1) = next(iter(roi_pool_bins(roi, 8, 10, (2, 2))))
    assert dashed[0].get_xy() == (c0 - 0.5, r0 - 0.5)
    points = artists[-1].get_xydata()
    assert len(points) == 2 * 2 * 4  # 2x2 bins of 2x2 samples
    plt.close(figure)
