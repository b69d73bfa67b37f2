"""Images in, one padded batch tensor out: normalize, resize, pad (inside the model).

Keeping these steps in the model means a checkpoint carries its own input
conventions: callers always pass float RGB images in [0, 1] at their own sizes.

- normalize: ``(image - pixel_mean) / pixel_std`` per channel;
- resize: the short side to ``min_size`` unless the long side would exceed
  ``max_size`` (then the long side to ``max_size``), keeping the aspect ratio;
- pad: bottom and right with zeros (the mean colour after normalization) up to the
  batch's largest size, rounded up to ``size_divisibility`` so every FPN level
  has an integer size.

Shape shorthand: N images; Hi, Wi: size of image i after resizing; Hp, Wp: padded size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minimrcnn.data.transforms import resized_shape  # the one resize rule, shared with the data side


@dataclass
class ImageBatch:
    """tensor: [N, 3, Hp, Wp]; image_sizes: (Hi, Wi) of each image inside the padding;
    scales: (sx, sy) per image, resized / original size along x and y."""

    tensor: torch.Tensor
    image_sizes: list[tuple[int, int]]
    scales: list[tuple[float, float]]


def resized_size_torchvision(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's rule: one factor ``min(min_size / short, max_size / long)``, sides floored.

    ``interpolate(scale_factor=s, recompute_scale_factor=True)`` makes each side
    ``floor(side * s)`` (in double precision), where :func:`~minimrcnn.data.transforms.resized_shape` rounds.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(math.floor(height * scale)), int(math.floor(width * scale))


RESIZE_RULES = {"round": resized_shape, "torchvision": resized_size_torchvision}


def normalize_and_resize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         min_size: int, max_size: int,
                         resize_rule: str = "round") -> tuple[torch.Tensor, tuple[float, float]]:
    """image: [3, H, W] in [0, 1] -> ([3, H', W'] normalized, (sx, sy) = (W'/W, H'/H))."""
    height, width = image.shape[-2:]
    image = (image - mean) / std
    new_height, new_width = RESIZE_RULES[resize_rule](height, width, min_size, max_size)
    if (new_height, new_width) != (height, width):
        image = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear",
                              align_corners=False)[0]
    return image, (new_width / width, new_height / height)


def pad_batch(images: list[torch.Tensor], size_divisibility: int) -> torch.Tensor:
    """[3, Hi, Wi] per image -> [N, 3, Hp, Wp], zero-padded at the bottom and right."""
    max_height = max(image.shape[-2] for image in images)
    max_width = max(image.shape[-1] for image in images)
    if size_divisibility > 1:
        max_height = math.ceil(max_height / size_divisibility) * size_divisibility
        max_width = math.ceil(max_width / size_divisibility) * size_divisibility
    if all(image.shape[-2:] == (max_height, max_width) for image in images):
        return torch.stack(images)
    batch = images[0].new_zeros((len(images), images[0].shape[0], max_height, max_width))
    for slot, image in zip(batch, images):
        slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


def batch_images(images: list[torch.Tensor], mean, std, min_size: int, max_size: int,
                 size_divisibility: int, resize_rule: str = "round") -> ImageBatch:
    """Normalize, resize and pad a list of [3, H, W] images into one ImageBatch.

    ``resize_rule``: "round" (:func:`~minimrcnn.data.transforms.resized_shape`) or "torchvision" (:func:`resized_size_torchvision`).
    """
    if resize_rule not in RESIZE_RULES:
        raise ValueError(f"resize_rule: expected one of {sorted(RESIZE_RULES)}, got {resize_rule!r}")
    mean = torch.as_tensor(mean, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    std = torch.as_tensor(std, dtype=images[0].dtype, device=images[0].device)[:, None, None]
    resized, scales = [], []
    for image in images:
        image, scale = normalize_and_resize(image, mean, std, min_size, max_size, resize_rule)
        resized.append(image)
        scales.append(scale)
    return ImageBatch(
        tensor=pad_batch(resized, size_divisibility),
        image_sizes=[tuple(image.shape[-2:]) for image in resized],
        scales=scales,
    )


__all__ = ["ImageBatch", "RESIZE_RULES", "batch_images", "normalize_and_resize", "pad_batch",
           "resized_size_torchvision"]
