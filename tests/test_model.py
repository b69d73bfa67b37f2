"""Tests for minimrcnn.modeling.model.MaskRCNN: the whole model, end to end."""

import dataclasses
import math

import pytest
import torch

from minimrcnn import MaskRCNN, get_config
from minimrcnn.data.transforms import resized_shape
from minimrcnn.modeling.image_list import batch_images
from minimrcnn.modeling.model import LOSS_NAMES, training_targets

NUM_CLASSES = 5
OVERFIT_ITERATIONS = 200


def tiny_config(**changes):
    """shapes-cpu, narrower and at 64-pixel images so every test stays fast."""
    base = dataclasses.replace(
        get_config("shapes-cpu"), min_size=(64,), min_size_test=64, max_size=96,
        backbone_width=8, fpn_channels=16, box_head_dim=32, mask_head_dim=16,
        rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=50,
        rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=50, roi_batch_size_per_image=32,
    )
    return dataclasses.replace(base, **changes)


def make_target(height, width, boxes, labels, iscrowd=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}
    if iscrowd is not None:
        target["iscrowd"] = torch.tensor(iscrowd, dtype=torch.int64)
    return target


def varied_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 60, 80, generator=generator), torch.rand(3, 72, 50, generator=generator)]
    targets = [make_target(60, 80, [[5, 5, 30, 25], [40, 20, 70, 55]], [1, 4]),
               make_target(72, 50, [[10, 30, 40, 70]], [2])]
    return images, targets


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_returns_the_five_finite_losses_for_varied_sizes(channels_last):
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(channels_last=channels_last, min_size=(56, 64, 72)))
    images, targets = varied_batch()
    losses = model(images, targets)
    assert tuple(sorted(losses)) == tuple(sorted(LOSS_NAMES))
    for name, value in losses.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()


def test_prediction_shapes_dtypes_and_original_coordinates():
    torch.manual_seed(0)
    # Test-time size 128: the model works at twice the input size, answers in input pixels.
    model = MaskRCNN(tiny_config(score_thresh=0.0, min_size_test=128, max_size=200))
    images, _ = varied_batch()
    model.train()
    predictions = model.predict(images)
    assert model.training  # predict restores the previous mode
    for image, prediction in zip(images, predictions):
        height, width = image.shape[-2:]
        count = len(prediction["boxes"])
        assert count > 0  # an untrained model scores all classes about equally: 0.2 > 0.0
        assert prediction["boxes"].shape == (count, 4) and prediction["boxes"].dtype == torch.float32
        assert prediction["labels"].shape == (count,) and prediction["labels"].dtype == torch.int64
        assert prediction["scores"].shape == (count,) and prediction["scores"].dtype == torch.float32
        assert prediction["masks"].shape == (count, height, width) and prediction["masks"].dtype == torch.bool
        boxes = prediction["boxes"]
        assert bool((boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all() and (boxes >= 0).all())
        assert bool((prediction["scores"][:-1] >= prediction["scores"][1:]).all())
        # Every pasted pixel lies inside its detection's box (within a pixel).
        for mask, (x0, y0, x1, y1) in zip(prediction["masks"], boxes.tolist()):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            if len(rows):
                assert cols.min() >= x0 - 1 and cols.max() <= x1 and rows.min() >= y0 - 1 and rows.max() <= y1


def test_no_ground_truth_and_no_detections():
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(score_thresh=1.0))  # softmax scores never exceed 1: no detections
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [make_target(64, 64, [], []), make_target(64, 64, [[1, 1, 9, 9]], [3], iscrowd=[1])]
    losses = model(images, targets)  # one image has nothing, the other only a crowd region
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box"].item() == 0.0
    sum(losses.values()).backward()
    for prediction in model.predict(images):
        assert prediction["boxes"].shape == (0, 4) and prediction["masks"].shape == (0, 64, 64)
        assert prediction["labels"].dtype == torch.int64


def test_training_targets_drop_crowd_and_rescale_boxes():
    target = make_target(10, 20, [[0, 0, 4, 4], [2, 2, 8, 6], [5, 5, 5, 9]], [1, 2, 3], iscrowd=[0, 1, 0])
    (prepared,) = training_targets([target], [(2.0, 3.0)])
    assert prepared["labels"].tolist() == [1]  # crowd and the zero-width box are gone
    assert prepared["boxes"].tolist() == [[0, 0, 8, 12]]
    assert prepared["masks"].shape == (1, 10, 20) and prepared["mask_scale"] == (2.0, 3.0)


def test_resize_and_padding():
    assert resized_shape(60, 80, 64, 96) == (64, 85)
    assert resized_shape(60, 200, 64, 96) == (29, 96)  # the long side caps the scale
    images = [torch.ones(3, 60, 80), torch.ones(3, 72, 50)]
    batch = batch_images(images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 64, 96, 32)
    assert batch.tensor.shape == (2, 3, 96, 96)
    assert batch.image_sizes == [(64, 85), (92, 64)]
    assert batch.scales[0] == pytest.approx((85 / 80, 64 / 60))
    assert batch.tensor[0, :, :64, :85].eq(2.0).all() and batch.tensor[0, :, 64:].eq(0).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[1].update(boxes=torch.tensor([[30.0, 10, 20, 40]])), r"targets\[1\]\['boxes'\].*x2 < x1"),
        (lambda t: t[0].update(masks=t[0]["masks"][:, :50]), r"targets\[0\]\['masks'\].*expected \[2, 60, 80\]"),
        (lambda t: t[0].update(labels=torch.tensor([1, 5])), r"targets\[0\]\['labels'\].*out of range"),
        (lambda t: t[0].update(labels=torch.tensor([1, 0])), r"targets\[0\]\['labels'\].*out of range"),
        (lambda t: t[0].update(labels=torch.tensor([1.0, 2.0])), r"targets\[0\]\['labels'\].*int64"),
        (lambda t: t[1].update(masks=t[1]["masks"].float()), r"targets\[1\]\['masks'\].*uint8"),
        (lambda t: t[0].update(boxes=torch.zeros(2, 5)), r"targets\[0\]\['boxes'\].*\[G, 4\]"),
        (lambda t: t[1].pop("labels"), r"targets\[1\].*missing field 'labels'"),
        (lambda t: t.pop(), r"targets: expected a list of 2"),
    ],
)
def test_bad_targets_give_clear_errors(change, message):
    model = MaskRCNN(tiny_config())
    images, targets = varied_batch()
    change(targets)
    with pytest.raises((ValueError, TypeError), match=message):
        model(images, targets)


def test_bad_images_and_missing_targets():
    model = MaskRCNN(tiny_config())
    with pytest.raises(TypeError, match="images"):
        model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"images\[1\]"):
        model.predict([torch.rand(3, 64, 64), torch.rand(64, 64)])
    with pytest.raises(ValueError, match="targets"):
        model([torch.rand(3, 64, 64)])


def test_non_finite_loss_names_the_loss():
    model = MaskRCNN(tiny_config())
    with torch.no_grad():
        model.roi_heads.box_head.class_logits.bias.fill_(float("nan"))
    images, targets = varied_batch()
    with pytest.raises(FloatingPointError, match="loss_classifier"):
        model(images, targets)


def mask_iou(a, b):
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


def test_overfits_a_few_shapes_images(tiny_shapes, one_thread):
    from minimrcnn.data.coco import CocoInstances, collate

    torch.manual_seed(0)
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_train.json")
    images, targets = collate([dataset[0], dataset[1]])
    model = MaskRCNN(get_config("shapes-cpu"))
    # Adam with a cosine decay overfits far sooner than SGD (the RoIs move as the RPN learns).
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / OVERFIT_ITERATIONS)))
    history = []
    for _ in range(OVERFIT_ITERATIONS):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        history.append({name: value.item() for name, value in losses.items()})
    start = sum(history[0].values())
    end = sum(sum(step.values()) for step in history[-10:]) / 10
    assert end < start / 10, (history[0], history[-1])
    for name in LOSS_NAMES:  # against each loss's early peak: the box loss starts near zero
        # (few proposals overlap an object before the RPN learns) and rises before it falls
        early = max(step[name] for step in history[:10])
        assert sum(step[name] for step in history[-10:]) / 10 < early, name
    best_ious = []  # per ground-truth object: its best same-class confident detection
    for prediction, target in zip(model.predict(images), targets):
        confident = prediction["scores"] > 0.5
        for gt_mask, gt_label in zip(target["masks"].bool(), target["labels"]):
            ious = [mask_iou(gt_mask, mask) for mask, label in
                    zip(prediction["masks"][confident], prediction["labels"][confident]) if label == gt_label]
            best_ious.append(max(ious, default=0.0))
    # Every object is found; on average its mask matches at IoU > 0.8 (a thin or occluded
    # shape may sit a little below: 14 x 14 masks are coarse for it).
    assert min(best_ious) > 0.5 and sum(best_ious) / len(best_ious) > 0.8, best_ious

