"""minimrcnn.interop and the torchvision-compatibility switches, without torchvision.

The comparison with torchvision itself is tests/test_interop_torchvision.py (side venv).
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from minimrcnn.config import Config, get_config
from minimrcnn.interop import (current_torchvision_names, from_torchvision, load_torchvision_state_dict,
                               torchvision_config)
from minimrcnn.modeling.anchors import AnchorGenerator, rounded_cell_anchors
from minimrcnn.data.transforms import resized_shape as resized_size
from minimrcnn.modeling.image_list import resized_size_torchvision
from minimrcnn.modeling.masks import paste_mask_probs_torchvision
from minimrcnn.modeling.model import MaskRCNN
from minimrcnn.modeling.poolers import assign_boxes_to_levels_torchvision
from minimrcnn.ops.nms_torchvision import batched_nms_torchvision, nms_torchvision

SMALL = dict(num_classes=3, backbone="resnet18", min_size=128, max_size=128)


def test_defaults_are_this_packages_conventions():
    config = Config()
    assert (config.resize_rule, config.anchor_offset, config.anchor_rounding, config.norm_eps,
            config.box_min_size, config.box_filtering, config.roi_aligned, config.roi_level_mapper,
            config.mask_paste) == ("round", 0.5, False, 1e-5, 0.0, "detectron2", True, "detectron2",
                                   "detectron2")
    for name in ("shapes-cpu", "shapes-gpu", "coco-r50-fpn"):
        preset = get_config(name)
        assert preset.box_filtering == "detectron2" and preset.roi_aligned


def test_torchvision_config_maps_constructor_keywords():
    config = torchvision_config(box_score_thresh=0.3, box_nms_thresh=0.4, box_detections_per_img=7,
                                rpn_pre_nms_top_n_test=11, rpn_post_nms_top_n_test=13, anchor_sizes=[1, 2, 3, 4, 5])
    assert (config.score_thresh, config.nms_thresh, config.detections_per_image) == (0.3, 0.4, 7)
    assert (config.rpn_pre_nms_topk_test, config.rpn_post_nms_topk_test) == (11, 13)
    assert config.anchor_sizes == (1, 2, 3, 4, 5) and config.num_classes == 91
    assert (config.roi_sampling_ratio, config.roi_aligned, config.anchor_offset) == (2, False, 0.0)
    with pytest.raises(ValueError, match=r"unknown keywords \['box_score_treshold'\]"):
        torchvision_config(box_score_treshold=0.3)
    with pytest.raises(ValueError, match="backbone"):
        torchvision_config(backbone="vgg16")


def test_rounded_cell_anchors_hand_computed():
    # size 32: ratio 0.5 -> w = 45.25, h = 22.63 -> halves 22.63, 11.31 -> rounded 23, 11.
    expected = torch.tensor([[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]], dtype=torch.float32)
    assert torch.equal(rounded_cell_anchors(32, (0.5, 1.0, 2.0)), expected)
    # size 9, ratio 1: halves are 4.5, rounded to even.
    assert torch.equal(rounded_cell_anchors(9, (1.0,)), torch.tensor([[-4.0, -4.0, 4.0, 4.0]]))


def test_rounded_anchors_take_stride_from_the_padded_size():
    generator = AnchorGenerator(sizes=(32, 64), aspect_ratios=(1.0,), strides=(32, 64), offset=0.0, rounded=True)
    # Padded image 160 x 160: P5 is 5 x 5, P6 = max_pool(k1, s2) of it is 3 x 3 -> stride 160 // 3 = 53.
    p5, p6 = torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 3, 3)
    anchors_p5, anchors_p6 = generator([p5, p6])
    assert torch.equal(anchors_p5[:2], torch.tensor([[-16.0, -16, 16, 16], [16, -16, 48, 16]]))
    assert torch.equal(anchors_p6[1], torch.tensor([53.0 - 32, -32, 53 + 32, 32]))


def test_resize_rules():
    assert resized_size_torchvision(96, 112, 128, 128) == (109, 128)  # 109.71 floored
    assert resized_size(96, 112, 128, 128) == (110, 128)  # rounded
    assert resized_size_torchvision(800, 1200, 800, 1333) == (800, 1200)
    assert resized_size_torchvision(480, 640, 800, 1333) == (800, 1066)  # 1066.67


def test_torchvision_level_mapper_hand_computed():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 112], [0, 0, 500, 500], [0, 0, 10, 10.0]])
    # floor(4 + log2(sqrt(A) / 224) + 1e-6), clamped to [2, 5].
    assert assign_boxes_to_levels_torchvision(boxes, 2, 5).tolist() == [4, 3, 2, 5, 2]


def _nms_reference(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS in float64, visiting boxes by decreasing score (stable)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    suppressed, kept = set(), []
    for position, i in enumerate(order):
        if i in suppressed:
            continue
        kept.append(i)
        for j in order[position + 1:]:
            width = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            height = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = width * height
            union = ((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                     + (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1]) - inter)
            if inter / union > threshold:
                suppressed.add(j)
    return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_torchvision_against_float64_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(200, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + torch.rand(200, 2, generator=generator) * 20 + 1], dim=1)
    scores = torch.rand(200, generator=generator)
    expected = _nms_reference(boxes.double().numpy(), scores.double().numpy(), 0.5)
    assert nms_torchvision(boxes, scores, 0.5).tolist() == expected


def test_batched_nms_torchvision_keeps_classes_apart():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms_torchvision(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms_torchvision(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]
    # More than 1000 boxes: torchvision's loop over classes, same answer.
    many = boxes.repeat(400, 1) + torch.arange(1200.0).repeat_interleave(1)[:, None] * 20
    kept = batched_nms_torchvision(many, torch.rand(1200), torch.zeros(1200, dtype=torch.int64), 0.5)
    assert len(kept) == 1200


def _bilinear_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """interpolate(mode="bilinear", align_corners=False) in float64, loop by loop."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = min(int(y), in_h - 1)
        y1 = min(y0 + 1, in_h - 1)
        for j in range(out_w):
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = min(int(x), in_w - 1)
            x1 = min(x0 + 1, in_w - 1)
            ly, lx = y - y0, x - x0
            out[i, j] = ((1 - ly) * ((1 - lx) * image[y0, x0] + lx * image[y0, x1])
                         + ly * ((1 - lx) * image[y1, x0] + lx * image[y1, x1]))
    return out


def test_torchvision_paste_against_reference():
    mask = torch.tensor([[[0.2, 0.9], [0.6, 1.0]]])  # [1, 2, 2]
    box = torch.tensor([[2.0, 3.0, 6.5, 6.0]])
    pasted = paste_mask_probs_torchvision(mask, box, (8, 9))[0].double().numpy()
    # Padded 4 x 4 mask; box expanded by 4/2 about its centre (4.25, 4.5): (0, 1.5, 8.5, 7.5)
    # -> int64 (0, 1, 8, 7); resized to 7 x 9 (inclusive) and clipped to the 8 x 9 image.
    padded = np.pad(mask[0].double().numpy(), 1)
    expected = np.zeros((8, 9))
    expected[1:8, 0:9] = _bilinear_resize_reference(padded, 7, 9)
    np.testing.assert_allclose(pasted, expected, atol=1e-6)


# ---------------------------------------------------------------- state dicts


def _to_torchvision_names(state_dict: dict, num_mask_convs: int = 4) -> dict:
    """This package's names -> torchvision's current ones (test-side inverse of the mapper),
    with a zero background row added to the box deltas and mask logits."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = re.sub(r"^backbone\.", "backbone.body.", key)
        new = re.sub(r"^fpn\.lateral_convs\.(\d)\.", r"backbone.fpn.inner_blocks.\1.0.", new)
        new = re.sub(r"^fpn\.output_convs\.(\d)\.", r"backbone.fpn.layer_blocks.\1.0.", new)
        new = new.replace("rpn.head.conv.", "rpn.head.conv.0.0.").replace("rpn.head.objectness_logits.",
                                                                          "rpn.head.cls_logits.")
        new = new.replace("rpn.head.anchor_deltas.", "rpn.head.bbox_pred.")
        new = new.replace("roi_heads.box_head.fc1.", "roi_heads.box_head.fc6.").replace(
            "roi_heads.box_head.fc2.", "roi_heads.box_head.fc7.")
        new = new.replace("roi_heads.box_head.class_logits.", "roi_heads.box_predictor.cls_score.")
        if key.startswith("roi_heads.box_head.box_deltas."):
            new = key.replace("roi_heads.box_head.box_deltas.", "roi_heads.box_predictor.bbox_pred.")
            value = torch.cat([torch.zeros_like(value[:4]), value])
        if key.startswith("roi_heads.mask_head.mask_logits."):
            new = key.replace("roi_heads.mask_head.mask_logits.", "roi_heads.mask_predictor.mask_fcn_logits.")
            value = torch.cat([torch.zeros_like(value[:1]), value])
        match = re.match(r"^roi_heads\.mask_head\.layers\.(\d+)\.(weight|bias)$", key)
        if match:
            index = int(match.group(1))
            new = (f"roi_heads.mask_predictor.conv5_mask.{match.group(2)}" if index == 2 * num_mask_convs
                   else f"roi_heads.mask_head.{index // 2}.0.{match.group(2)}")
        renamed[new] = value
    return renamed


@pytest.fixture(scope="module")
def small_model_and_state():
    torch.manual_seed(0)
    model = MaskRCNN(torchvision_config(**SMALL, norm="bn", norm_eps=1e-5))
    return model, _to_torchvision_names(model.state_dict())


def test_round_trip_through_torchvision_names(small_model_and_state, tmp_path):
    model, state = small_model_and_state
    path = tmp_path / "weights.pth"
    torch.save({k: v for k, v in state.items()}, path)
    loaded = from_torchvision(path, **SMALL)
    assert not loaded.training
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, loaded.state_dict()[key]), key


def test_frozen_state_dict_gets_frozen_bn_with_eps_zero(small_model_and_state):
    _, state = small_model_and_state  # no num_batches_tracked: FrozenBatchNorm2d's state
    loaded = from_torchvision(state, **SMALL)
    assert (loaded.config.norm, loaded.config.norm_eps) == ("frozen_bn", 0.0)
    assert loaded.backbone.bn1.eps == 0.0 and loaded.backbone.layer4[1].bn2.eps == 0.0


def test_legacy_names_are_renamed():
    legacy = {"rpn.head.conv.weight": 1, "backbone.fpn.inner_blocks.2.bias": 2,
              "backbone.fpn.layer_blocks.0.weight": 3, "roi_heads.mask_head.mask_fcn1.weight": 4,
              "roi_heads.mask_head.mask_fcn4.bias": 5, "backbone.body.conv1.weight": 6}
    assert current_torchvision_names(legacy) == {
        "rpn.head.conv.0.0.weight": 1, "backbone.fpn.inner_blocks.2.0.bias": 2,
        "backbone.fpn.layer_blocks.0.0.weight": 3, "roi_heads.mask_head.0.0.weight": 4,
        "roi_heads.mask_head.3.0.bias": 5, "backbone.body.conv1.weight": 6}


def test_bad_keys_are_listed(small_model_and_state):
    model, state = small_model_and_state
    bad = dict(state)
    bad["roi_heads.bogus.weight"] = torch.zeros(1)
    del bad["rpn.head.cls_logits.bias"]
    bad["roi_heads.box_head.fc7.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as error:
        load_torchvision_state_dict(model, bad)
    message = str(error.value)
    assert "unknown keys (1): roi_heads.bogus.weight" in message
    assert "missing keys (1): rpn.head.objectness_logits.bias" in message
    assert "shape mismatches (1): roi_heads.box_head.fc7.weight (3, 3)" in message


def test_class_count_mismatch_is_named(small_model_and_state):
    _, state = small_model_and_state
    with pytest.raises(ValueError, match=r"num_classes=91, but the weights score 3 classes"):
        from_torchvision(state, backbone="resnet18")


def test_train_init_from_torchvision(small_model_and_state, tiny_shapes, tmp_path):
    from minimrcnn.engine.checkpoint import load_checkpoint
    from minimrcnn.engine.train import train

    _, state = small_model_and_state
    weights = tmp_path / "tv.pth"
    torch.save(state, weights)
    config = dataclasses.replace(get_config("shapes-cpu"), batch_size=2, max_iter=1, backbone_depth=18)
    train(config, tmp_path / "run", data_root=tiny_shapes, evaluate=False, progress=False,
          init_from_torchvision=weights)
    saved = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert saved["config"]["num_classes"] == 5 and saved["config"]["roi_aligned"] is False
    model_state = saved["model"]
    assert model_state["roi_heads.box_head.class_logits.weight"].shape[0] == 5
    # The trunk came from the file (one SGD step moves it only slightly).
    first_conv = dict(current_torchvision_names(state))["backbone.body.conv1.weight"]
    assert (model_state["backbone.conv1.weight"] - first_conv).abs().max() < 0.05
    json.dumps(saved["config"])
