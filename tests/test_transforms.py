"""Transforms keep image, boxes and masks consistent; hand-computed sizes; bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minimrcnn.data import CocoInstances, Compose, Normalize, RandomHorizontalFlip, Resize
from minimrcnn.data.transforms import resized_shape


def tight_xyxy(mask: torch.Tensor) -> list[int]:
    """Pixel-edge box [x1, y1, x2 + 1, y2 + 1] of a [H, W] mask, by scanning rows and columns."""
    rows = [y for y in range(mask.shape[0]) if bool(mask[y].any())]
    cols = [x for x in range(mask.shape[1]) if bool(mask[:, x].any())]
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.fixture(scope="module")
def samples(tiny_shapes):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_val.json")
    return [dataset[i] for i in range(4)]


def clone(target):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}


@pytest.mark.parametrize(("height", "width", "min_size", "max_size", "expected"), [
    (480, 640, 800, 1333, (800, 1067)),  # short side to 800
    (100, 1000, 800, 1333, (133, 1333)),  # long side capped at 1333
    (128, 128, 64, 1000, (64, 64)),
    (128, 96, 96, 1000, (128, 96)),  # already the right size
])
def test_resized_shape_by_hand(height, width, min_size, max_size, expected):
    assert resized_shape(height, width, min_size, max_size) == expected


@pytest.mark.parametrize(("min_size", "max_size"), [(200, 1000), (64, 1000), (300, 150), (97, 1000)])
def test_resize_keeps_boxes_on_masks(samples, min_size, max_size):
    for image, target in samples:
        before = clone(target)
        resized, out = Resize(min_size, max_size)(image, target)
        expected_shape = resized_shape(128, 128, min_size, max_size)
        assert resized.shape == (3, *expected_shape) and resized.dtype == torch.float32
        assert out["masks"].shape == (len(target["labels"]), *expected_shape) and out["masks"].dtype == torch.uint8
        for box, mask in zip(out["boxes"], out["masks"]):
            assert np.allclose(box.tolist(), tight_xyxy(mask), atol=1.0), (box, tight_xyxy(mask))
        assert torch.equal(target["boxes"], before["boxes"]) and torch.equal(target["masks"], before["masks"])
        assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == target["image_id"]


def bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Float64 loops: sample at output pixel centres mapped into the input (half-pixel convention)."""
    channels, in_h, in_w = image.shape
    out = np.zeros((channels, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
            x = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            ly, lx = y - y0, x - x0
            out[:, i, j] = ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
                            + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])
    return out


@pytest.mark.parametrize("min_size", [9, 3])
def test_resize_image_is_bilinear(min_size):
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    resized, _ = Resize(min_size, 1000)(image, None)
    out_h, out_w = resized_shape(5, 7, min_size, 1000)
    assert resized.shape == (3, out_h, out_w)
    assert np.allclose(resized.numpy(), bilinear_reference(image.double().numpy(), out_h, out_w), atol=1e-6)


def test_resize_draws_from_a_tuple(samples):
    image, target = samples[0]
    resize = Resize((64, 96, 160), 1000)
    torch.manual_seed(0)
    heights = {resize(image, target)[0].shape[1] for _ in range(30)}
    assert heights == {64, 96, 160}


def test_resize_empty_target():
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros((0, 10, 20), dtype=torch.uint8), "iscrowd": torch.zeros(0, dtype=torch.int64),
              "image_id": 1}
    image, out = Resize(20, 100)(torch.rand(3, 10, 20), target)
    assert image.shape == (3, 20, 40) and out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 20, 40)


def test_flip_mirrors_everything(samples):
    for image, target in samples:
        flipped, out = RandomHorizontalFlip(p=1.0)(image, target)
        assert np.array_equal(flipped.numpy(), image.numpy()[:, :, ::-1])
        assert np.array_equal(out["masks"].numpy(), target["masks"].numpy()[:, :, ::-1])
        for box, mask in zip(out["boxes"], out["masks"]):
            assert box.tolist() == tight_xyxy(mask)  # shapes boxes are tight, so exact after a flip
        again, back = RandomHorizontalFlip(p=1.0)(flipped, out)
        assert torch.equal(again, image) and torch.equal(back["boxes"], target["boxes"])
        same, unchanged = RandomHorizontalFlip(p=0.0)(image, target)
        assert same is image and unchanged is target


def test_flip_probability():
    flip = RandomHorizontalFlip(p=0.5)
    image = torch.arange(6.0).reshape(1, 1, 6).expand(3, 1, 6)
    torch.manual_seed(0)
    flips = sum(bool(flip(image, None)[0][0, 0, 0] == 5) for _ in range(400))
    assert 150 < flips < 250


def test_normalize():
    image = torch.rand(3, 4, 5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out, target = Normalize(mean, std)(image, None)
    assert target is None
    for c in range(3):
        assert torch.allclose(out[c], (image[c] - mean[c]) / std[c])


def test_compose_chains_in_order(samples):
    image, target = samples[1]
    composed = Compose([RandomHorizontalFlip(1.0), Resize(64, 1000), Normalize((0.5,) * 3, (0.5,) * 3)])
    out_image, out = composed(image, target)
    step_image, step = RandomHorizontalFlip(1.0)(image, target)
    step_image, step = Resize(64, 1000)(step_image, step)
    assert torch.allclose(out_image, step_image * 2 - 1, atol=1e-6)
    assert torch.equal(out["boxes"], step["boxes"]) and torch.equal(out["masks"], step["masks"])
    assert composed(image, None)[1] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_size"):
        Resize(0, 100)
    with pytest.raises(ValueError, match="min_size"):
        Resize((), 100)
    with pytest.raises(ValueError, match="max_size"):
        Resize(10, -1)
    with pytest.raises(ValueError, match="p: expected a probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="std"):
        Normalize((0, 0, 0), (1, 0, 1))


# ------------------------------------------------------------------ colour jitter


def colour_jitter_reference(image, brightness, contrast, saturation):
    """float64 NumPy reference of ColorJitter with given factors."""
    x = image.double().numpy() * brightness
    luma = np.array([0.299, 0.587, 0.114]).reshape(3, 1, 1)
    mean_grey = (x * luma).sum(0).mean()
    x = (x - mean_grey) * contrast + mean_grey
    grey = (x * luma).sum(0, keepdims=True)
    x = (x - grey) * saturation + grey
    return np.clip(x, 0, 1)


def test_colour_jitter_matches_the_reference_and_keeps_the_target():
    from minimrcnn.data.transforms import ColorJitter

    image = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]), "masks": torch.ones(1, 9, 7, dtype=torch.uint8)}
    torch.manual_seed(3)
    draws = [1 + 0.4 * (2 * float(torch.rand(())) - 1) for _ in range(3)]
    torch.manual_seed(3)
    jittered, same_target = ColorJitter(0.4)(image, target)
    assert same_target is target
    np.testing.assert_allclose(jittered.numpy(), colour_jitter_reference(image, *draws), atol=1e-6)
    assert not torch.allclose(jittered, image)
    assert ColorJitter(0.0)(image, target)[0] is image
    with pytest.raises(ValueError, match="strength"):
        ColorJitter(1.5)


def test_training_loader_applies_colour_jitter_only_when_asked(tiny_shapes):
    import dataclasses

    from minimrcnn.config import get_config
    from minimrcnn.data.transforms import ColorJitter
    from minimrcnn.engine.distributed import InfiniteBatchSampler
    from minimrcnn.engine.train import build_train_loader

    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_train.json")
    sampler = InfiniteBatchSampler(len(dataset), 2, 0, 0, 1, 1)
    plain = get_config("shapes-cpu")
    assert isinstance(build_train_loader(dataset, plain, sampler, torch.device("cpu")).dataset.transform,
                      RandomHorizontalFlip)
    jittered = build_train_loader(dataset, dataclasses.replace(plain, color_jitter=0.3), sampler,
                                  torch.device("cpu")).dataset.transform
    assert isinstance(jittered, Compose) and isinstance(jittered.transforms[-1], ColorJitter)
