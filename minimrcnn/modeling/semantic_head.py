"""The semantic segmentation branch of Panoptic FPN (Kirillov et al. 2019).

Every pixel gets a semantic class: one class for "any thing" (all instance categories
together) plus one per stuff category (sky, ground, ...), as Detectron2 prepares COCO
panoptic data. The branch reads P2..P5 and brings each to 1/4 of the input:

    P5 [N, C, H/32, W/32] -> 3 x (conv3x3 -> GN -> ReLU -> 2x up) -> [N, D, H/4, W/4]
    P4 [N, C, H/16, W/16] -> 2 x (conv3x3 -> GN -> ReLU -> 2x up) -> [N, D, H/4, W/4]
    P3 [N, C, H/8,  W/8 ] -> 1 x (conv3x3 -> GN -> ReLU -> 2x up) -> [N, D, H/4, W/4]
    P2 [N, C, H/4,  W/4 ] -> conv3x3 -> GN -> ReLU (no upsampling)  -> [N, D, H/4, W/4]

The four maps are summed (the paper: summing beat concatenating), a 1x1 conv gives
the class logits at 1/4 scale, and 4x bilinear upsampling brings them to the padded
input size. The loss is the per-pixel cross-entropy, averaged over labelled pixels
(``IGNORE_LABEL`` marks unlabelled ones), times a weight (0.5 in Detectron2's
panoptic configs, against 1 for the instance losses).

Shape shorthand:
    N: images, C: FPN channels, D: the head's channels (128), S: semantic classes
    Hp, Wp: padded input size (a multiple of 32); Hi, Wi: one image inside the padding
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimrcnn.modeling.norm import group_norm

SEMANTIC_LEVELS = (2, 3, 4, 5)  # the branch reads P2..P5 (not P6)
COMMON_STRIDE = 4  # every level is brought to 1/4 of the input, the stride of P2
IGNORE_LABEL = 255  # unlabelled pixels (and the padding) take no part in the loss
THING_CLASS = 0  # semantic class 0 is "any thing"; stuff categories are 1..S-1


class SemanticStage(nn.Sequential):
    """conv3x3 -> GroupNorm -> ReLU, then 2x bilinear upsampling when ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),  # GN has a bias
            group_norm(out_channels),
            nn.ReLU(inplace=True),
        )
        self.upsample = upsample
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = super().forward(features)
        if self.upsample:
            features = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
        return features


def stages_for_level(level: int, in_channels: int, channels: int) -> nn.Sequential:
    """The stages that bring level ``level`` (stride 2**level) to stride 4.

    P2 is already at stride 4: one stage without upsampling. P_l (l > 2) needs l - 2
    doublings, each stage doing one.
    """
    first_level = SEMANTIC_LEVELS[0]
    num_stages = max(1, level - first_level)
    upsample = level > first_level
    stages = [SemanticStage(in_channels if index == 0 else channels, channels, upsample)
              for index in range(num_stages)]
    return nn.Sequential(*stages)


class SemanticHead(nn.Module):
    """P2..P5 -> semantic logits [N, S, Hp, Wp] (``forward``); ``loss`` against targets."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128,
                 loss_weight: float = 0.5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: expected at least 2 (the thing class and a stuff class), "
                             f"got {num_classes}")
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        # One branch per level, kept in a ModuleList in SEMANTIC_LEVELS order.
        self.levels = nn.ModuleList(stages_for_level(level, in_channels, channels) for level in SEMANTIC_LEVELS)
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def per_level_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """[P2, P3, P4, P5, ...] -> four maps [N, D, H/4, W/4] (extra levels such as P6 unused)."""
        if len(features) < len(SEMANTIC_LEVELS):
            raise ValueError(f"features: the semantic head needs P2..P5, got {len(features)} levels")
        return [branch(level_features) for branch, level_features in zip(self.levels, features)]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features: FPN maps from P2 on, P_l [N, C, Hp / 2**l, Wp / 2**l] -> logits [N, S, Hp, Wp]."""
        summed = torch.stack(self.per_level_features(features)).sum(dim=0)  # [N, D, Hp/4, Wp/4]
        logits = self.predictor(summed)  # [N, S, Hp/4, Wp/4]
        return F.interpolate(logits, scale_factor=COMMON_STRIDE, mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy over labelled pixels. logits [N, S, Hp, Wp]; targets [N, Hp, Wp]
        int64 in 0..S-1 or ``IGNORE_LABEL``. With no labelled pixel at all the loss is a zero
        that still depends on the logits (so every parameter receives a gradient)."""
        if logits.shape[-2:] != targets.shape[-2:]:
            raise ValueError(f"targets: expected {tuple(logits.shape[-2:])} pixels like the logits, "
                             f"got {tuple(targets.shape[-2:])}")
        if not (targets == IGNORE_LABEL).logical_or(targets < self.num_classes).all():
            raise ValueError(f"targets: semantic labels must be 0..{self.num_classes - 1} "
                             f"or {IGNORE_LABEL} (ignored)")
        if not (targets != IGNORE_LABEL).any():
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_LABEL, reduction="mean")
        return self.loss_weight * loss


def semantic_targets(sem_segs: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                     padded_size: tuple[int, int]) -> torch.Tensor:
    """Per-image semantic labels [H, W] at original size -> one batch [N, Hp, Wp] int64.

    Each map is resized (nearest, sampling each output pixel at its centre, as the masks
    in ``data.transforms``) to its image's resized size (Hi, Wi) and padded with
    ``IGNORE_LABEL``, so the padding never counts in the loss.
    """
    batch = torch.full((len(sem_segs), *padded_size), IGNORE_LABEL, dtype=torch.int64,
                       device=sem_segs[0].device if sem_segs else None)
    for slot, sem_seg, (height, width) in zip(batch, sem_segs, image_sizes):
        labels = sem_seg.to(torch.uint8 if sem_seg.max() <= 255 else torch.int64)
        if tuple(labels.shape) != (height, width):
            # interpolate works on float; labels <= 255 are exact in float32.
            labels = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest-exact")[0, 0]
        slot[:height, :width] = labels.to(torch.int64)
    return batch


def build_semantic_head(config) -> SemanticHead:
    """The semantic head of ``config``: 1 thing class + ``num_stuff_classes`` stuff classes."""
    if tuple(config.fpn_levels[:len(SEMANTIC_LEVELS)]) != SEMANTIC_LEVELS:
        raise ValueError(f"config.fpn_levels: the semantic head needs P2..P5, got {config.fpn_levels}")
    return SemanticHead(config.fpn_channels, 1 + config.num_stuff_classes,
                        channels=config.semantic_channels, loss_weight=config.semantic_loss_weight)


__all__ = ["COMMON_STRIDE", "IGNORE_LABEL", "SEMANTIC_LEVELS", "SemanticHead", "THING_CLASS",
           "build_semantic_head", "semantic_targets"]
