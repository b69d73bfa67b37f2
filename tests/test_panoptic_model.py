"""MaskRCNN with and without the semantic branch: off is exactly the plain model; on adds
only the branch, its loss and the panoptic outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.data import collate
from minimrcnn.data.panoptic import shapes_panoptic
from minimrcnn.modeling.model import LOSS_NAMES, SEMANTIC_LOSS_NAME, MaskRCNN
from minimrcnn.modeling.panoptic import fuse

# shapes-cpu's parameter count (a pin against anything the branch might add to the plain model):
# 1,851,704 on the code before the semantic branch existed, at 64 FPN / 64 mask-head channels;
# recounted when the preset moved to 32 / 32.
SHAPES_CPU_NUM_PARAMETERS = 1_248_120


def build(config, seed=0):
    torch.manual_seed(seed)
    return MaskRCNN(config)


@pytest.fixture(scope="module")
def batch(tiny_shapes):
    dataset = shapes_panoptic(tiny_shapes, "train")
    return collate([dataset[i] for i in range(2)])


def test_branch_off_is_the_plain_model(batch, one_thread):
    plain_config = get_config("shapes-cpu")
    assert plain_config.semantic_head is False
    # The panoptic settings are inert while the head is off.
    off_config = dataclasses.replace(plain_config, num_stuff_classes=7, semantic_channels=8,
                                     semantic_loss_weight=3.0, panoptic_stuff_area_thresh=1)
    plain, off = build(plain_config), build(off_config)
    assert off.semantic_head is None
    plain_state, off_state = plain.state_dict(), off.state_dict()
    assert list(plain_state) == list(off_state)
    assert not any("semantic" in key for key in plain_state)
    assert sum(p.numel() for p in plain.parameters()) == SHAPES_CPU_NUM_PARAMETERS
    for key in plain_state:
        assert torch.equal(plain_state[key], off_state[key]), key
    images, targets = batch
    plain.train(), off.train()
    torch.manual_seed(1)
    plain_losses = plain(images, targets)
    torch.manual_seed(1)
    off_losses = off(images, targets)
    assert sorted(off_losses) == sorted(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert torch.equal(plain_losses[name], off_losses[name]), name
    plain_out, off_out = plain.predict(images), off.predict(images)
    for a, b in zip(plain_out, off_out):
        assert sorted(b) == ["boxes", "labels", "masks", "scores"]
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_branch_on_adds_only_the_branch_and_its_loss(batch, one_thread):
    plain = build(get_config("shapes-cpu"))
    config = get_config("shapes-cpu-panoptic")
    model = build(config, seed=5)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("semantic_head.") for key in extra)
    assert set(plain.state_dict()) <= set(model.state_dict())
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected
    images, targets = batch
    plain.train(), model.train()
    torch.manual_seed(1)
    plain_losses = plain(images, targets)
    torch.manual_seed(1)
    losses = model(images, targets)
    assert sorted(losses) == sorted((*LOSS_NAMES, SEMANTIC_LOSS_NAME))
    for name in LOSS_NAMES:  # the branch reads the features, it changes no instance loss
        torch.testing.assert_close(losses[name], plain_losses[name], rtol=0, atol=0)
    assert losses[SEMANTIC_LOSS_NAME].item() > 0
    losses[SEMANTIC_LOSS_NAME].backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(name.startswith("semantic_head.") for name in grads)
    assert any(name.startswith("backbone.") for name in grads)  # joint training reaches the backbone
    assert not any(name.startswith(("rpn.", "roi_heads.")) for name in grads)


def test_panoptic_predictions_are_the_fusion_of_the_outputs(batch, one_thread):
    config = get_config("shapes-cpu-panoptic")
    model = build(config)
    images, _ = batch
    predictions = model.predict(images)
    for image, prediction in zip(images, predictions):
        height, width = image.shape[-2:]
        assert prediction["sem_seg"].shape == (1 + config.num_stuff_classes, height, width)
        assert prediction["panoptic_seg"].shape == (height, width)
        panoptic, info = fuse(prediction["masks"], prediction["scores"], prediction["labels"],
                              prediction["sem_seg"].argmax(dim=0), score_thresh=config.panoptic_score_thresh,
                              overlap_thresh=config.panoptic_overlap_thresh,
                              stuff_area_thresh=config.panoptic_stuff_area_thresh,
                              stuff_category_ids=[0, 5, 6])
        assert torch.equal(panoptic, prediction["panoptic_seg"])
        assert info == prediction["segments_info"]


def test_semantic_targets_are_required_and_checked(batch):
    model = build(get_config("shapes-cpu-panoptic")).train()
    images, targets = batch
    without = [{k: v for k, v in t.items() if k != "sem_seg"} for t in targets]
    with pytest.raises(ValueError, match=r"targets\[0\]\['sem_seg'\].*CocoPanoptic"):
        model(images, without)
    bad = [dict(t) for t in targets]
    bad[1]["sem_seg"] = torch.full_like(targets[1]["sem_seg"], 3)
    with pytest.raises(ValueError, match=r"targets\[1\]\['sem_seg'\]: label 3 is out of range 0..2"):
        model(images, bad)
