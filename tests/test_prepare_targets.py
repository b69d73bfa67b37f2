"""Targets prepared on the CPU in the data loader (minimrcnn.data.prepare): crowds and empty boxes
dropped and values checked there, so the model skips its device-side filtering and checks."""

import sys
from pathlib import Path

import pytest
import torch

from minimrcnn import MaskRCNN, get_config
from minimrcnn.data.prepare import PREPARED, collate_for_training, prepare_training_target
from minimrcnn.engine.step_ops import count_step_ops
from minimrcnn.modeling import model as model_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from model import synthetic_batch  # noqa: E402


def with_crowd_and_empty(target):
    """The target plus a crowd object and a zero-height box (both to be dropped)."""
    extra_boxes = torch.tensor([[2.0, 2, 30, 30], [5.0, 7, 20, 7]])
    masks = target["masks"]
    return {
        "boxes": torch.cat([target["boxes"], extra_boxes]),
        "labels": torch.cat([target["labels"], torch.tensor([1, 2])]),
        "masks": torch.cat([masks, torch.ones(2, *masks.shape[1:], dtype=masks.dtype)]),
        "iscrowd": torch.cat([target["iscrowd"], torch.tensor([1, 0])]),
        "image_id": 7,
    }


def batch(num_images=2, seed=0):
    images, targets = synthetic_batch(num_images, (64, 64), 64, 3, 5, torch.Generator().manual_seed(seed),
                                      torch.device("cpu"))
    return images, [with_crowd_and_empty(t) for t in targets]


def test_prepare_drops_crowds_and_empty_boxes_and_marks_the_target():
    _, targets = batch(1)
    prepared = prepare_training_target(targets[0], num_classes=5)
    assert prepared[PREPARED] is True and prepared["image_id"] == 7
    assert torch.equal(prepared["boxes"], targets[0]["boxes"][:3])
    assert torch.equal(prepared["labels"], targets[0]["labels"][:3])
    assert torch.equal(prepared["masks"], targets[0]["masks"][:3])
    assert torch.equal(prepared["iscrowd"], torch.zeros(3, dtype=torch.int64))
    assert PREPARED not in targets[0] and targets[0]["boxes"].shape[0] == 5  # the input is left alone
    assert model_module.PREPARED == PREPARED  # the model reads the same mark


@pytest.mark.parametrize("field, index, value, message", [
    ("boxes", (1, 2), float("nan"), r"targets\[0\] \(image_id 7\)\['boxes'\]: box 1 .* NaN"),
    ("boxes", (0, 2), -1.0, r"box 0 .* x2 < x1"),
    ("labels", 2, 5, r"\['labels'\]: label 5 of object 2 is out of range 1..4"),
    ("labels", 0, 0, r"label 0 of object 0"),
])
def test_collate_names_the_bad_value(field, index, value, message):
    images, targets = batch(1)
    targets[0][field][index] = value
    with pytest.raises(ValueError, match=message):
        collate_for_training([(images[0], targets[0])], num_classes=5)


def test_prepared_targets_give_the_same_losses_with_fewer_device_reads():
    config = get_config("shapes-gpu")
    images, targets = batch(2)
    _, prepared = collate_for_training(list(zip(images, targets)), config.num_classes)
    losses = []
    for given in (targets, prepared):
        torch.manual_seed(0)
        model = MaskRCNN(config).train()
        torch.manual_seed(1)
        losses.append({name: value.item() for name, value in model(images, given).items()})
    # The RPN sees the same valid ground truth: identical losses. The RoI sampler draws one random
    # key per candidate slot (proposals + padded ground truth), and the padding is smaller
    # without the dropped objects, so its draws (not their distribution) differ.
    for name in ("loss_objectness", "loss_rpn_box"):
        assert losses[0][name] == losses[1][name], name
    counts = []
    for given in (targets, prepared):
        torch.manual_seed(0)
        counts.append(count_step_ops(MaskRCNN(config).train(), images, given))
    assert counts[1].syncs < counts[0].syncs and counts[1].total < counts[0].total, (counts[0].sync_by_op,
                                                                                      counts[1].sync_by_op)


def test_the_model_still_checks_unprepared_and_debug_targets(monkeypatch):
    config = get_config("shapes-gpu")
    model = MaskRCNN(config).train()
    images, targets = batch(1)
    targets[0]["labels"][0] = 9
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: label 9"):
        model(images, targets)
    forged = dict(targets[0], **{PREPARED: True})  # marked but never prepared: trusted...
    assert model_module.targets_prepared([forged])
    monkeypatch.setattr("minimrcnn.ops._validate.DEBUG_CHECKS", True)  # ...unless debugging
    assert not model_module.targets_prepared([forged])
    with pytest.raises(ValueError, match=r"label 9"):
        model(images, [forged])
