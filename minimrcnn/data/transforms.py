"""Transforms on ``(image, target)`` pairs: resize, horizontal flip, normalize.

``image`` is float [3, H, W]; ``target`` is the dict of ``CocoInstances`` (boxes [M, 4]
xyxy, masks [M, H, W], ...; ``CocoPanoptic`` adds sem_seg [H, W]) or None. Each transform returns a new target dict and never
changes the one it was given. Random choices use torch's generator, so ``torch.manual_seed``
makes them repeatable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Compose:
    """Apply transforms one after the other."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms})"


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_height, new_width): short side ``min_size`` unless the long side would pass ``max_size``."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(round(height * scale)), int(round(width * scale))


class Resize:
    """Resize so the short side is ``min_size`` (one drawn at random from a tuple) and the long
    side at most ``max_size``. Image: bilinear; masks: nearest; boxes: scaled per axis."""

    def __init__(self, min_size, max_size: int):
        sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"min_size: expected a positive int or a non-empty tuple of them, got {min_size!r}")
        if not (isinstance(max_size, int) and max_size > 0):
            raise ValueError(f"max_size: expected a positive int, got {max_size!r}")
        self.min_sizes, self.max_size = sizes, max_size

    def __call__(self, image, target=None):
        min_size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()))] if len(self.min_sizes) > 1 \
            else self.min_sizes[0]
        height, width = image.shape[-2:]
        new_height, new_width = resized_shape(height, width, min_size, self.max_size)
        if (new_height, new_width) == (height, width):
            return image, target
        image = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear",
                              align_corners=False)[0]
        if target is None:
            return image, None
        target = dict(target)
        scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
        masks = target["masks"]  # [M, H, W]
        if masks.shape[0] == 0:
            target["masks"] = masks.new_zeros((0, new_height, new_width))
        else:
            # "nearest-exact" samples each output pixel at its centre, so mask and scaled box agree.
            target["masks"] = F.interpolate(masks[None], size=(new_height, new_width), mode="nearest-exact")[0]
        if "sem_seg" in target:  # semantic labels [H, W] (CocoPanoptic): nearest, like the masks
            sem_seg = target["sem_seg"]
            target["sem_seg"] = F.interpolate(sem_seg[None, None], size=(new_height, new_width),
                                              mode="nearest-exact")[0, 0]
        return image, target

    def __repr__(self):
        return f"Resize(min_size={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, boxes and masks left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, image, target=None):
        if not float(torch.rand(())) < self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        if target is None:
            return image, None
        target = dict(target)
        boxes = target["boxes"]
        target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        target["masks"] = target["masks"].flip(-1)
        if "sem_seg" in target:
            target["sem_seg"] = target["sem_seg"].flip(-1)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """image <- (image - mean) / std per channel; the target is unchanged."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"std: every entry must be positive, got {std!r}")

    def __call__(self, image, target=None):
        return (image - self.mean) / self.std, target

    def __repr__(self):
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
