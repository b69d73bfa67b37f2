"""The Panoptic FPN semantic branch: structure, shapes, the loss against a float64 reference,
the batched targets, and the semantic targets CocoPanoptic reads from the panoptic PNGs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from minimrcnn.data.coco import CocoFormatError
from minimrcnn.data.panoptic import SEMANTIC_IGNORE, SEMANTIC_THING, rgb_to_segment_ids, shapes_panoptic
from minimrcnn.data.transforms import RandomHorizontalFlip, Resize
from minimrcnn.modeling.semantic_head import IGNORE_LABEL, SemanticHead, semantic_targets


def pyramid(batch=2, channels=8, height=64, width=96, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, height // 2**level, width // 2**level, generator=generator, dtype=dtype)
            for level in (2, 3, 4, 5, 6)]


def test_stages_per_level_follow_the_paper():
    head = SemanticHead(in_channels=8, num_classes=3, channels=16)
    # P2: one conv, no upsampling; P3: 1 stage; P4: 2; P5: 3, each conv3x3 -> GN -> ReLU -> 2x up.
    assert [len(level) for level in head.levels] == [1, 1, 2, 3]
    assert [[stage.upsample for stage in level] for level in head.levels] == \
        [[False], [True], [True, True], [True, True, True]]
    for level in head.levels:
        for stage in level:
            conv, norm, relu = stage
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.out_channels == 16
            assert isinstance(norm, nn.GroupNorm) and isinstance(relu, nn.ReLU)
    assert head.predictor.kernel_size == (1, 1) and head.predictor.out_channels == 3


def test_shapes_per_level_and_logits():
    head = SemanticHead(in_channels=8, num_classes=3, channels=16)
    features = pyramid()
    per_level = head.per_level_features(features)
    assert [tuple(f.shape) for f in per_level] == [(2, 16, 16, 24)] * 4  # all at 1/4 scale
    logits = head(features)  # P6 is ignored
    assert logits.shape == (2, 3, 64, 96)
    # The logits are the 1x1 conv of the summed levels, upsampled 4x bilinearly.
    summed = sum(per_level)
    expected = torch.nn.functional.interpolate(head.predictor(summed), scale_factor=4, mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(logits, expected)


def reference_cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore: int) -> float:
    """float64 loop: mean over labelled pixels of -log softmax(logits)[target]."""
    total, count = 0.0, 0
    batch, _, height, width = logits.shape
    for n in range(batch):
        for y in range(height):
            for x in range(width):
                label = targets[n, y, x]
                if label == ignore:
                    continue
                scores = logits[n, :, y, x].astype(np.float64)
                log_norm = np.log(np.exp(scores - scores.max()).sum()) + scores.max()
                total += log_norm - scores[label]
                count += 1
    return total / count


def test_loss_matches_float64_reference_with_ignore_and_weight():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 8, 12, generator=generator) * 3
    targets = torch.randint(0, 3, (2, 8, 12), generator=generator)
    targets[0, :3] = IGNORE_LABEL
    targets[1, :, -5:] = IGNORE_LABEL
    head = SemanticHead(in_channels=4, num_classes=3, channels=8, loss_weight=0.3)
    loss = head.loss(logits, targets)
    expected = 0.3 * reference_cross_entropy(logits.numpy(), targets.numpy(), IGNORE_LABEL)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_without_labelled_pixels_is_zero_but_keeps_gradients():
    head = SemanticHead(in_channels=8, num_classes=3, channels=16)
    features = pyramid(height=32, width=32)
    logits = head(features)
    loss = head.loss(logits, torch.full((2, 32, 32), IGNORE_LABEL, dtype=torch.int64))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())


def test_loss_rejects_bad_labels_and_sizes():
    head = SemanticHead(in_channels=8, num_classes=3, channels=16)
    logits = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="0..2"):
        head.loss(logits, torch.full((1, 4, 4), 3))
    with pytest.raises(ValueError, match="pixels like the logits"):
        head.loss(logits, torch.zeros(1, 4, 5, dtype=torch.int64))


def test_gradcheck_float64():
    torch.manual_seed(0)
    head = SemanticHead(in_channels=2, num_classes=3, channels=4).double()
    features = [f.requires_grad_() for f in pyramid(batch=1, channels=2, height=64, width=64,
                                                     dtype=torch.float64)[:4]]
    targets = torch.randint(0, 3, (1, 64, 64))
    targets[0, :4] = IGNORE_LABEL
    assert torch.autograd.gradcheck(lambda *f: head.loss(head(list(f)), targets), features)


def test_semantic_targets_resize_and_pad_with_ignore():
    sem_seg = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)  # [2, 2]
    batch = semantic_targets([sem_seg, sem_seg], [(4, 4), (2, 2)], (4, 6))
    assert batch.shape == (2, 4, 6) and batch.dtype == torch.int64
    # Image 0 resized 2x by nearest: every label becomes a 2 x 2 block.
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])
    assert torch.equal(batch[0, :, :4], expected)
    assert (batch[0, :, 4:] == IGNORE_LABEL).all()
    # Image 1 at its own size, the rest padding.
    assert torch.equal(batch[1, :2, :2], sem_seg.long())
    assert (batch[1, 2:] == IGNORE_LABEL).all() and (batch[1, :, 2:] == IGNORE_LABEL).all()


# ---------------------------------------------------------------- targets from the panoptic PNGs


def test_targets_from_the_shapes_panoptic_pngs(tiny_shapes):
    dataset = shapes_panoptic(tiny_shapes, "val")
    assert dataset.stuff_names == ["things", "sky", "ground"]
    panoptic = json.loads((tiny_shapes / "annotations/panoptic_val.json").read_text())
    category_of = {c["id"]: c for c in panoptic["categories"]}
    saw_crowd = False
    for index in range(len(dataset)):
        _, target = dataset[index]
        sem_seg = target["sem_seg"]
        annotation = dataset.panoptic_of_image[target["image_id"]]
        with Image.open(tiny_shapes / "panoptic/val" / annotation["file_name"]) as picture:
            ids = rgb_to_segment_ids(np.array(picture.convert("RGB")))
        assert sem_seg.shape == ids.shape and sem_seg.dtype == torch.uint8
        for segment in annotation["segments_info"]:
            inside = torch.from_numpy(ids == segment["id"])
            category = category_of[segment["category_id"]]
            expected = SEMANTIC_THING if category["isthing"] else 1 + ["sky", "ground"].index(category["name"])
            assert (sem_seg[inside] == expected).all()
        # Every instance mask, crowds included, is thing; the thing pixels are exactly their union.
        union = target["masks"].bool().any(dim=0)
        assert torch.equal(sem_seg == SEMANTIC_THING, union)
        saw_crowd |= bool(target["iscrowd"].any())
    assert saw_crowd  # val image 2 holds a crowd, which is "thing" in the semantic target


def _copy_val(tiny_shapes, tmp_path):
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root)
    return root


def test_void_pixels_are_ignored_and_unlisted_ids_fail(tiny_shapes, tmp_path):
    root = _copy_val(tiny_shapes, tmp_path)
    path = root / "annotations/panoptic_val.json"
    panoptic = json.loads(path.read_text())
    annotation = panoptic["annotations"][0]
    png = root / "panoptic/val" / annotation["file_name"]
    rgb = np.array(Image.open(png).convert("RGB"))
    ids = rgb_to_segment_ids(rgb)
    void_segment = annotation["segments_info"][0]
    rgb[ids == void_segment["id"]] = 0  # make this segment void in the PNG
    Image.fromarray(rgb).save(png)
    annotation["segments_info"] = annotation["segments_info"][1:]
    path.write_text(json.dumps(panoptic))
    dataset = shapes_panoptic(root, "val")
    _, target = dataset[0]
    assert (target["sem_seg"][torch.from_numpy(ids == void_segment["id"])] == SEMANTIC_IGNORE).all()
    assert (target["sem_seg"][torch.from_numpy(ids != void_segment["id"])] != SEMANTIC_IGNORE).all()

    # A segment id in the PNG that the JSON does not list is an error naming the file and id.
    second = panoptic["annotations"][1]
    dropped = second["segments_info"].pop(0)
    path.write_text(json.dumps(panoptic))
    dataset = shapes_panoptic(root, "val")
    with pytest.raises(CocoFormatError, match=rf"{second['file_name']}: segment id {dropped['id']}"):
        dataset[1]


def test_resize_and_flip_move_sem_seg_with_the_masks(tiny_shapes):
    dataset = shapes_panoptic(tiny_shapes, "train")
    image, target = dataset[0]
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)
    assert torch.equal(flipped["sem_seg"], target["sem_seg"].flip(-1))
    _, resized = Resize(64, 64)(image, target)
    assert resized["sem_seg"].shape == (64, 64) and resized["sem_seg"].dtype == torch.uint8
    # Nearest sampling at pixel centres, as the masks: thing pixels are still the union of the masks.
    assert torch.equal(resized["sem_seg"] == SEMANTIC_THING, resized["masks"].bool().any(dim=0))
