"""Anchors: reference boxes tiled over every feature-map cell of every FPN level.

Shape shorthand: L: levels; Hi, Wi: size of level i; A: anchors per cell
(one size per level times the aspect ratios).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Anchors depend only on the feature-map sizes: keep those of the last few batch shapes.
# Unbounded, multi-scale training on images of varied shapes (COCO) would keep one
# set of anchors per padded batch size ever seen.
ANCHOR_CACHE_SIZE = 16


def cell_anchors(size: float, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """The A anchors of one cell, centred on (0, 0): [A, 4] xyxy.

    An aspect ratio is height / width; every anchor keeps the area size**2:
    ``w = sqrt(size**2 / ratio)``, ``h = ratio * w``. Not rounded.
    """
    anchors = []
    for ratio in aspect_ratios:
        width = math.sqrt(size * size / ratio)
        height = ratio * width
        anchors.append([-width / 2, -height / 2, width / 2, height / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def rounded_cell_anchors(size: float, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """torchvision's cell anchors: [A, 4] xyxy rounded to integers (halves to even).

    Same shapes as :func:`cell_anchors` (``w = size / sqrt(ratio)``, ``h = size * sqrt(ratio)``),
    computed in float32 in torchvision's order so the rounding lands the same way:
    a 32-pixel anchor of ratio 0.5 becomes [-23, -11, 23, 11] (45.25 x 22.6 before rounding).
    """
    ratios = torch.tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    scale = torch.tensor([size], dtype=torch.float32)
    widths = (w_ratios[:, None] * scale[None, :]).view(-1)  # (A, 1) -> (A,)
    heights = (h_ratios[:, None] * scale[None, :]).view(-1)
    return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()


def grid_anchors(cell: torch.Tensor, grid_size: tuple[int, int], stride,
                 offset: float) -> torch.Tensor:
    """Tile cell anchors [A, 4] over a Hi x Wi grid -> [Hi * Wi * A, 4] in (y, x, anchor) order.

    The cell (y, x) is centred at ``((x + offset) * stride, (y + offset) * stride)``
    in image coordinates; ``stride`` is one int or a (stride_y, stride_x) pair.
    """
    height, width = grid_size
    stride_y, stride_x = stride if isinstance(stride, tuple) else (stride, stride)
    shifts_x = (torch.arange(width, dtype=torch.float32) + offset) * stride_x
    shifts_y = (torch.arange(height, dtype=torch.float32) + offset) * stride_y
    centre_y, centre_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    centres = torch.stack((centre_x, centre_y, centre_x, centre_y), dim=-1).reshape(-1, 1, 4)
    # (Hi*Wi, 1, 4) + (1, A, 4) -> (Hi*Wi, A, 4) -> (Hi*Wi*A, 4)
    return (centres + cell.reshape(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """One anchor size per level and a few aspect ratios, at each level's stride.

    ``offset=0.5`` centres anchors on the cells (the pixel block a feature covers);
    Detectron2's and torchvision's default is 0.0 (the cell's top-left corner).
    ``rounded=True`` is torchvision's convention: integer cell anchors
    (:func:`rounded_cell_anchors`) and each level's stride taken as padded image size //
    grid size per axis (for an odd-sized P5, P6's stride is then not 64).
    """

    def __init__(self, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 strides=(4, 8, 16, 32, 64), offset: float = 0.5, rounded: bool = False):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"sizes ({len(sizes)}) and strides ({len(strides)}) need one entry per level")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"offset must be in [0, 1), got {offset}")
        # A level's entry is one size or, for a single-level (no FPN) model, a tuple of sizes.
        self.sizes = tuple(tuple(float(v) for v in s) if isinstance(s, (tuple, list)) else float(s) for s in sizes)
        sizes_per_level = {len(s) if isinstance(s, tuple) else 1 for s in self.sizes}
        if len(sizes_per_level) != 1:
            raise ValueError(f"sizes: every level needs the same number of sizes (one shared RPN head), got {sizes}")
        self.sizes_per_level = sizes_per_level.pop()
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.rounded = bool(rounded)
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    @property
    def num_anchors_per_cell(self) -> int:
        return self.sizes_per_level * len(self.aspect_ratios)

    def level_cell_anchors(self, size) -> torch.Tensor:
        """[A, 4] cell anchors of a level: its one size, or its sizes in order, times the ratios."""
        if isinstance(size, tuple):
            return torch.cat([cell_anchors(s, self.aspect_ratios) for s in size])
        return cell_anchors(size, self.aspect_ratios)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: L maps [N, C, Hi, Wi] -> L anchor tensors [Hi * Wi * A, 4]."""
        if len(features) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(features)}")
        key = tuple(tuple(f.shape[-2:]) for f in features) + (str(features[0].device),)
        anchors = self._cache.pop(key, None)
        if anchors is None and self.rounded:
            # The padded image size, exactly: the finest level divides it by its stride.
            padded = [extent * self.strides[0] for extent in features[0].shape[-2:]]
            anchors = [
                grid_anchors(rounded_cell_anchors(size, self.aspect_ratios), tuple(f.shape[-2:]),
                             (padded[0] // f.shape[-2], padded[1] // f.shape[-1]),
                             self.offset).to(features[0].device)
                for size, f in zip(self.sizes, features)
            ]
        if anchors is None:
            anchors = [
                grid_anchors(self.level_cell_anchors(size), tuple(f.shape[-2:]), stride,
                             self.offset).to(features[0].device)
                for size, stride, f in zip(self.sizes, self.strides, features)
            ]
        self._cache[key] = anchors  # re-inserted: the dict is ordered from least to most recent
        if len(self._cache) > ANCHOR_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        return anchors
