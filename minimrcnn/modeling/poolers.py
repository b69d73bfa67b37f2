"""Multi-scale RoI feature extraction: give each RoI one FPN level, pool it there.

A small box is best described by a fine, high-resolution level and a large box by
a coarse one. FPN (Lin et al. 2017, Eqn. 1) assigns a box of size ``sqrt(w h)`` to

    k = floor(k0 + log2(sqrt(w h) / canonical_size))

where a box of ``canonical_size`` pixels (224, the ImageNet crop) lands on level
``k0`` (4). Only P2-P5 carry RoIs, as in the paper: P6 exists for the RPN's
largest anchors only.

Shape shorthand:
    N: images in the batch
    R: RoIs in the batch (all images together)
    C: channels of every FPN level
    Hl, Wl: height and width of level l
    S: pooled output size (7 for boxes, 14 for masks)
"""

from __future__ import annotations

import torch
from torch import nn

from minimrcnn.modeling.fpn import feature_levels_of
from minimrcnn.ops.roi_align import roi_align, roi_align_levels
from minimrcnn.ops.roi_pool import roi_pool, roi_pool_levels
from minimrcnn.ops.roi_warp import roi_warp, roi_warp_levels

# FPN levels that may carry RoIs (P2-P5, FPN paper section 4.2).
ROI_LEVELS = (2, 3, 4, 5)
# Keeps log2 finite for zero-area boxes (they land on the lowest level).
LEVEL_EPS = 1e-8
ROI_OPS = ("align", "pool", "warp", "warp_max", "align_max")
# The bilinear ablations of Table 2c: roi_op -> (quantize the corners as RoIPool?, reduction over samples).
WARP_OPS = {"warp": (True, "avg"), "warp_max": (True, "max"), "align_max": (False, "max")}
TORCHVISION_LEVEL_EPS = 1e-6  # torchvision's LevelMapper adds it to the level itself


def assign_boxes_to_levels(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
) -> torch.Tensor:
    """FPN Eqn. (1): the level number of each box, clamped to [min_level, max_level].

    boxes: [R, 4] xyxy. Returns [R] int64 level numbers (e.g. 2..5).
    """
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    sizes = torch.sqrt(widths * heights)
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + LEVEL_EPS))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


def assign_boxes_to_levels_torchvision(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_level: int = 4,
    canonical_size: float = 224.0,
) -> torch.Tensor:
    """torchvision's level mapper: ``floor(k0 + log2(sqrt(area) / s0) + 1e-6)``, clamped.

    Differs from :func:`assign_boxes_to_levels` in where the epsilon sits (added to the
    level, not inside the log): boxes within about 1e-6 of a level boundary can land one
    level apart. No clamp of negative sizes (torchvision's boxes are never empty here).
    boxes: [R, 4] -> [R] int64.
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size)
                         + torch.tensor(TORCHVISION_LEVEL_EPS, dtype=sizes.dtype))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


LEVEL_MAPPERS = {"detectron2": assign_boxes_to_levels, "torchvision": assign_boxes_to_levels_torchvision}


def usable_levels(feature_levels: tuple[int, ...]) -> tuple[int, ...]:
    """The levels among ``feature_levels`` that may carry RoIs (those in P2-P5)."""
    levels = tuple(level for level in feature_levels if level in ROI_LEVELS)
    if not levels or list(levels) != list(range(levels[0], levels[-1] + 1)):
        raise ValueError(
            f"feature_levels {tuple(feature_levels)} must include consecutive levels among {ROI_LEVELS}"
        )
    return levels


class MultiScaleRoIPooler(nn.Module):
    """Pools every RoI from its FPN level with RoIAlign (or RoIPool, for the ablation).

    Args:
        output_size: S, side of the pooled square.
        feature_levels: the level number of each feature map passed to ``forward``
            (e.g. (2, 3, 4, 5, 6)); level l has stride 2**l.
        roi_op: "align" (bilinear, no quantization: Mask R-CNN), "pool" (RoIPool), or one of
            WARP_OPS: "warp" (quantized corners, bilinear average), "warp_max", "align_max".
        sampling_ratio: RoIAlign samples per bin side; <= 0 means ceil(roi_size / S).
        aligned: RoIAlign's half-pixel offset (True: Detectron2; False: torchvision's detectors).
        level_mapper: "detectron2" (:func:`assign_boxes_to_levels`) or "torchvision".
    """

    def __init__(
        self,
        output_size: int,
        feature_levels: tuple[int, ...],
        roi_op: str = "align",
        sampling_ratio: int = 0,
        canonical_level: int = 4,
        canonical_size: float = 224.0,
        aligned: bool = True,
        level_mapper: str = "detectron2",
    ):
        super().__init__()
        if roi_op not in ROI_OPS:
            raise ValueError(f"roi_op must be one of {ROI_OPS}, got {roi_op!r}")
        if level_mapper not in LEVEL_MAPPERS:
            raise ValueError(f"roi_level_mapper must be one of {sorted(LEVEL_MAPPERS)}, got {level_mapper!r}")
        self.aligned = bool(aligned)
        self.level_mapper = level_mapper
        self.output_size = int(output_size)
        self.feature_levels = tuple(int(level) for level in feature_levels)
        self.roi_levels = usable_levels(self.feature_levels)
        self.roi_op = roi_op
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_level = canonical_level
        self.canonical_size = float(canonical_size)

    def assign_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """[R, 4] boxes -> [R] level numbers, clamped to ``self.roi_levels`` (consecutive, as FPN's)."""
        return LEVEL_MAPPERS[self.level_mapper](
            boxes, min(self.roi_levels), max(self.roi_levels),
            self.canonical_level, self.canonical_size,
        )

    def pool_level(self, features: torch.Tensor, rois: torch.Tensor, level: int) -> torch.Tensor:
        """features: [N, C, Hl, Wl] of level ``level``; rois: [r, 5] -> [r, C, S, S]."""
        scale = 1.0 / 2**level
        # The RoI kernels take float32/float64 only (features may be bf16 under autocast).
        if features.dtype not in (torch.float32, torch.float64):
            features = features.float()
        rois = rois.to(features.dtype)
        if self.roi_op == "align":
            return roi_align(
                features, rois, self.output_size, spatial_scale=scale,
                sampling_ratio=self.sampling_ratio, aligned=self.aligned,
            )
        if self.roi_op in WARP_OPS:
            quantize, reduction = WARP_OPS[self.roi_op]
            return roi_warp(
                features, rois, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio,
                aligned=True, quantize=quantize, reduction=reduction,
            )
        return roi_pool(features, rois, self.output_size, spatial_scale=scale)

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features: one [N, C, Hl, Wl] per entry of ``feature_levels``; rois: [R, 5].

        Returns [R, C, S, S], row r pooled from the level that RoI r was assigned to.
        """
        if len(features) != len(self.feature_levels):
            raise ValueError(
                f"features: expected {len(self.feature_levels)} maps for levels "
                f"{self.feature_levels}, got {len(features)}"
            )
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(f"rois: expected [R, 5], got {tuple(rois.shape)}")
        num_channels = features[0].shape[1]
        size = self.output_size
        if rois.shape[0] == 0:
            return features[0].new_zeros((0, num_channels, size, size))
        if rois.is_cuda:
            return self.pool_all_levels(features, rois)
        roi_levels = self.assign_levels(rois[:, 1:])
        # Group the RoIs by level with one stable sort, and read the group sizes back once
        # (one host-device sync per call instead of one ``nonzero`` per level).
        order = torch.argsort(roi_levels, stable=True)
        min_level = min(self.roi_levels)
        counts = torch.bincount(roi_levels - min_level, minlength=len(self.roi_levels)).tolist()
        sorted_rois = rois[order]
        pooled_per_level, start = [], 0
        for level, level_features in zip(self.feature_levels, features):
            if level not in self.roi_levels:
                continue
            count = counts[level - min_level]
            if count == 0:
                continue
            pooled_per_level.append(self.pool_level(level_features, sorted_rois[start:start + count], level))
            start += count
        # Undo the grouping by level: row r of the output is RoI r.
        pooled = torch.cat(pooled_per_level)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # index_select, not pooled[inverse]: its backward is a plain index_add, several
        # times faster on CPU than advanced indexing's accumulating index_put.
        return pooled.index_select(0, inverse)

    def pool_all_levels(self, features: list[torch.Tensor], rois: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """The roi_op of every RoI from its level in one op call: on CUDA one kernel launch for all
        levels, with no grouping by level and no read-back of the group sizes (what ``forward``
        does on CUDA). The same numbers as ``forward``'s per-level calls.

        features: one [N, C, Hl, Wl] per entry of ``feature_levels``; rois: [R, 5] -> [R, C, S, S].
        """
        maps = [features[self.feature_levels.index(level)] for level in self.roi_levels]
        level_index = self.assign_levels(rois[:, 1:]) - self.roi_levels[0]  # consecutive levels
        scales = tuple(1.0 / 2**level for level in self.roi_levels)
        if self.roi_op in WARP_OPS:  # (aligned, as pool_level calls roi_warp)
            quantize, reduction = WARP_OPS[self.roi_op]
            return roi_warp_levels(maps, rois, level_index, self.output_size, scales, self.sampling_ratio, True,
                                   quantize, reduction, backend)
        if self.roi_op == "pool":
            return roi_pool_levels(maps, rois, level_index, self.output_size, scales, backend)
        return roi_align_levels(maps, rois, level_index, self.output_size, scales,
                                sampling_ratio=self.sampling_ratio, aligned=self.aligned, backend=backend)


def build_pooler(config, output_size: int, feature_levels: tuple[int, ...] | None = None):
    """A pooler for the config's feature levels (``fpn_levels``, or the single stride-16 map when
    ``backbone_fpn`` is False) with the config's RoI op and sampling ratio."""
    return MultiScaleRoIPooler(
        output_size,
        feature_levels if feature_levels is not None else feature_levels_of(config),
        roi_op=config.roi_op,
        sampling_ratio=config.roi_sampling_ratio,
        canonical_level=config.roi_canonical_level,
        canonical_size=config.roi_canonical_size,
        aligned=config.roi_aligned,
        level_mapper=config.roi_level_mapper,
    )


__all__ = [
    "MultiScaleRoIPooler",
    "ROI_LEVELS",
    "assign_boxes_to_levels",
    "assign_boxes_to_levels_torchvision",
    "build_pooler",
    "usable_levels",
]
