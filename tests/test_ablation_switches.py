"""The Table-2 ablation switches of the config: each builds, trains a few steps and predicts,
and each changes what it says (and only that)."""

import dataclasses

import pytest
import torch

from minimrcnn import MaskRCNN, get_config
from minimrcnn.data import CocoInstances
from minimrcnn.modeling.fpn import FPN, SingleLevelNeck
from minimrcnn.modeling.mask_head import FCNMaskHead, MLPMaskHead, mask_loss, mask_probabilities
from minimrcnn.modeling.poolers import MultiScaleRoIPooler
from minimrcnn.ops.roi_align import roi_align
from minimrcnn.ops.roi_pool import roi_pool
from minimrcnn.ops.roi_warp import roi_warp

SWITCHES = {
    "roipool": {"roi_op": "pool"},
    "roiwarp": {"roi_op": "warp"},
    "roiwarp_max": {"roi_op": "warp_max"},
    "roialign_max": {"roi_op": "align_max"},
    "softmax": {"mask_loss": "softmax"},
    "class_agnostic": {"mask_class_agnostic": True},
    "class_agnostic_softmax": {"mask_class_agnostic": True, "mask_loss": "softmax"},
    "mlp": {"mask_head": "mlp"},
    "mask28": {"mask_resolution": 28},
    "c4": {"backbone_fpn": False},
}


def tiny_config(**changes):
    base = dataclasses.replace(
        get_config("shapes-cpu"), backbone_width=8, fpn_channels=16, box_head_dim=32, mask_head_dim=16,
        rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=50, rpn_pre_nms_topk_test=100,
        rpn_post_nms_topk_test=50, roi_batch_size_per_image=32, base_lr=0.01, warmup_iters=0,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def batch(tiny_shapes):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_train.json")
    images, targets = zip(*(dataset[i] for i in range(2)))
    return list(images), list(targets)


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_every_switch_builds_trains_and_predicts(name, batch, one_thread):
    torch.manual_seed(0)
    model = MaskRCNN(tiny_config(**SWITCHES[name]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = batch
    before = [p.detach().clone() for p in model.roi_heads.mask_head.parameters()]
    for _ in range(2):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert losses["loss_mask"] > 0  # the mask head was trained on foreground RoIs
    assert any(not torch.equal(a, b) for a, b in zip(before, model.roi_heads.mask_head.parameters()))
    predictions = model.predict(images)
    for image, prediction in zip(images, predictions):
        count = len(prediction["boxes"])
        assert prediction["masks"].shape == (count, *image.shape[-2:])
        assert prediction["labels"].dtype == torch.int64


def test_the_switches_reach_the_modules():
    model = MaskRCNN(tiny_config(roi_op="warp_max", mask_class_agnostic=True, mask_head="mlp",
                                 mask_resolution=28, backbone_fpn=False))
    assert isinstance(model.fpn, SingleLevelNeck)
    assert model.roi_heads.box_pooler.roi_op == "warp_max" and model.roi_heads.box_pooler.feature_levels == (4,)
    assert isinstance(model.roi_heads.mask_head, MLPMaskHead)
    assert model.roi_heads.mask_head.num_thing_classes == 1 and model.roi_heads.mask_head.resolution == 28
    # every anchor size on the one stride-16 map: 4 sizes x 3 ratios per cell
    assert model.rpn.anchor_generator.strides == (16,) and model.rpn.anchor_generator.num_anchors_per_cell == 12
    default = MaskRCNN(tiny_config())
    assert isinstance(default.fpn, FPN) and isinstance(default.roi_heads.mask_head, FCNMaskHead)
    assert default.roi_heads.mask_head.mask_logits.out_channels == 4  # K = 4 thing classes
    assert default.rpn.anchor_generator.strides == (4, 8, 16, 32)


def test_c4_map_has_stride_16_and_its_anchors_cover_all_sizes():
    model = MaskRCNN(tiny_config(backbone_fpn=False))
    features = model.fpn(model.backbone(torch.rand(1, 3, 128, 128)))
    assert len(features) == 1 and features[0].shape == (1, 16, 8, 8)
    anchors = model.rpn.anchor_generator(features)[0]  # [8 * 8 * 12, 4]
    assert anchors.shape == (8 * 8 * 12, 4)
    sides = torch.sqrt((anchors[:12, 2] - anchors[:12, 0]) * (anchors[:12, 3] - anchors[:12, 1]))
    torch.testing.assert_close(sides, torch.tensor([12.0, 24, 48, 96]).repeat_interleave(3))


@pytest.mark.parametrize("roi_op", ["align", "pool", "warp", "warp_max", "align_max"])
def test_pooler_calls_the_op_it_names(roi_op):
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 2, 16, 16, generator=generator)]
    rois = torch.tensor([[0, 3.3, 5.1, 30.7, 41.9], [0, 10.0, 2.0, 60.0, 50.0]])
    pooled = MultiScaleRoIPooler(7, (2,), roi_op=roi_op, sampling_ratio=0)(features, rois)
    expected = {
        "align": lambda: roi_align(features[0], rois, 7, 0.25, 0, True),
        "pool": lambda: roi_pool(features[0], rois, 7, 0.25),
        "warp": lambda: roi_warp(features[0], rois, 7, 0.25, 0, True, True, "avg"),
        "warp_max": lambda: roi_warp(features[0], rois, 7, 0.25, 0, True, True, "max"),
        "align_max": lambda: roi_warp(features[0], rois, 7, 0.25, 0, True, False, "max"),
    }[roi_op]()
    assert torch.equal(pooled, expected)
    others = [roi_align(features[0], rois, 7, 0.25, 0, True), roi_pool(features[0], rois, 7, 0.25)]
    if roi_op not in ("align", "pool"):
        assert all(not torch.allclose(pooled, other) for other in others)


def test_class_agnostic_masks_share_one_channel_for_every_class():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 4, 4, generator=generator, requires_grad=True)
    classes = torch.tensor([1, 3, 4])
    targets = (torch.rand(3, 4, 4, generator=generator) > 0.5).float()
    for loss_type in ("sigmoid", "softmax"):
        loss = mask_loss(logits, classes, targets, loss_type)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets)
        torch.testing.assert_close(loss, expected)  # softmax([0, z]) == sigmoid(z): the same loss
        probabilities = mask_probabilities(logits, classes, loss_type)
        torch.testing.assert_close(probabilities, logits[:, 0].sigmoid())
    with pytest.raises(ValueError, match="roi_op"):
        MultiScaleRoIPooler(7, (2,), roi_op="warp_avg")
