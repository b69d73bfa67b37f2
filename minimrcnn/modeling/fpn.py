"""Feature Pyramid Network (Lin et al. 2017): one feature map per level, all with the same channels.

Each backbone map C_l gets a 1x1 "lateral" conv to ``out_channels``; going top-down,
the coarser merged map is upsampled (nearest, to the lateral's exact size so odd
sizes work) and added; a 3x3 "output" conv then smooths each sum into P_l. Levels
above 5 are stride-2 subsamples of the level below (P6 from P5: Detectron2's
``LastLevelMaxPool``, a 1x1 max-pool with stride 2).

Every level now holds both fine spatial detail (from C_l) and strong semantics
(from the levels above), so small objects are detected on fine levels with deep features.

Shape shorthand:
    N: images, C: out_channels, l: a pyramid level, stride 2**l
    C_l: [N, c_l, H / 2**l, W / 2**l] from the backbone (l = 2..5)
    P_l: [N, C,   H / 2**l, W / 2**l]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FIRST_BACKBONE_LEVEL = 2  # C2 has stride 4 = 2**2
LAST_BACKBONE_LEVEL = 5  # C5 has stride 32 = 2**5


def check_levels(levels) -> tuple[int, ...]:
    """``levels`` as a tuple after checking it is increasing, consecutive and starts in 2..5."""
    levels = tuple(int(level) for level in levels)
    if not levels:
        raise ValueError("fpn_levels: must name at least one level")
    if levels[0] < FIRST_BACKBONE_LEVEL or levels[0] > LAST_BACKBONE_LEVEL:
        raise ValueError(f"fpn_levels: the first level must be in 2..5 (a backbone stage), got {levels}")
    if any(b != a + 1 for a, b in zip(levels, levels[1:])):
        raise ValueError(f"fpn_levels: levels must be consecutive and increasing, got {levels}")
    return levels


class FPN(nn.Module):
    """Top-down pyramid over backbone maps ``[C2, C3, C4, C5]``.

    Args:
        backbone_channels: channels of C2..C5 (four ints; unused stages may be anything).
        out_channels: channels of every P_l.
        levels: consecutive pyramid levels to return, e.g. (2, 3, 4, 5, 6); levels <= 5
            come from the matching backbone stage, levels > 5 by stride-2 subsampling.

    ``forward([C2, C3, C4, C5]) -> [P_l for l in levels]``; ``self.strides[i] = 2**levels[i]``.
    """

    def __init__(self, backbone_channels, out_channels: int = 256, levels=(2, 3, 4, 5, 6)):
        super().__init__()
        self.levels = check_levels(levels)
        backbone_channels = list(backbone_channels)
        if len(backbone_channels) != LAST_BACKBONE_LEVEL - FIRST_BACKBONE_LEVEL + 1:
            raise ValueError(f"backbone_channels: expected 4 values (C2..C5), got {backbone_channels}")
        if out_channels < 1:
            raise ValueError(f"fpn_channels: expected a positive int, got {out_channels!r}")
        self.backbone_levels = [level for level in self.levels if level <= LAST_BACKBONE_LEVEL]
        self.num_extra_levels = len(self.levels) - len(self.backbone_levels)
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for level in self.backbone_levels:
            in_channels = backbone_channels[level - FIRST_BACKBONE_LEVEL]
            self.lateral_convs.append(nn.Conv2d(in_channels, out_channels, 1))
            self.output_convs.append(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.out_channels = out_channels
        self.strides = [2**level for level in self.levels]
        for conv in [*self.lateral_convs, *self.output_convs]:
            # "Xavier" fill as Detectron2's c2_xavier_fill: kaiming uniform with a = 1.
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, backbone_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """backbone_features: [C2, C3, C4, C5] -> [P_l for l in self.levels], finest first."""
        if len(backbone_features) != LAST_BACKBONE_LEVEL - FIRST_BACKBONE_LEVEL + 1:
            raise ValueError(f"backbone_features: expected 4 maps (C2..C5), got {len(backbone_features)}")
        inputs = [backbone_features[level - FIRST_BACKBONE_LEVEL] for level in self.backbone_levels]
        # Walk from the coarsest backbone level down to the finest.
        merged = self.lateral_convs[-1](inputs[-1])
        outputs = [self.output_convs[-1](merged)]
        for index in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral_convs[index](inputs[index])
            # Upsample to the lateral's exact size: an odd-sized C_l is not twice C_{l+1}.
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + top_down
            outputs.insert(0, self.output_convs[index](merged))
        for _ in range(self.num_extra_levels):
            # P6 = 1x1 max-pool with stride 2 of P5: keeps every other cell.
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


# Without FPN the heads work on one map of stride 16 = 2**4: res4's output ("C4").
SINGLE_LEVEL = 4


class SingleLevelNeck(nn.Module):
    """The no-FPN ablation: ``forward([C2, C3, C4, C5]) -> [1x1 conv of C4]``, one [N, C, H/16, W/16] map.

    The 1x1 conv only gives C4 the channels the heads expect; no top-down path, no other level,
    so small objects must be found on a stride-16 map (C5 is computed by the backbone but unused).
    """

    def __init__(self, backbone_channels, out_channels: int = 256):
        super().__init__()
        backbone_channels = list(backbone_channels)
        if len(backbone_channels) != LAST_BACKBONE_LEVEL - FIRST_BACKBONE_LEVEL + 1:
            raise ValueError(f"backbone_channels: expected 4 values (C2..C5), got {backbone_channels}")
        self.levels = (SINGLE_LEVEL,)
        self.out_channels = out_channels
        self.strides = [2**SINGLE_LEVEL]
        self.projection = nn.Conv2d(backbone_channels[SINGLE_LEVEL - FIRST_BACKBONE_LEVEL], out_channels, 1)
        nn.init.kaiming_uniform_(self.projection.weight, a=1)
        nn.init.zeros_(self.projection.bias)

    def forward(self, backbone_features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(backbone_features) != LAST_BACKBONE_LEVEL - FIRST_BACKBONE_LEVEL + 1:
            raise ValueError(f"backbone_features: expected 4 maps (C2..C5), got {len(backbone_features)}")
        return [self.projection(backbone_features[SINGLE_LEVEL - FIRST_BACKBONE_LEVEL])]


def feature_levels_of(config) -> tuple[int, ...]:
    """The levels the RPN and RoI heads see: ``fpn_levels``, or (4,) when ``backbone_fpn`` is False."""
    return tuple(config.fpn_levels) if getattr(config, "backbone_fpn", True) else (SINGLE_LEVEL,)


def build_fpn(config, backbone_out_channels) -> FPN | SingleLevelNeck:
    """The FPN of ``config`` (fpn_channels, fpn_levels) over a backbone with ``backbone_out_channels``,
    or the single stride-16 map when ``config.backbone_fpn`` is False."""
    if not getattr(config, "backbone_fpn", True):
        return SingleLevelNeck(backbone_out_channels, out_channels=config.fpn_channels)
    return FPN(backbone_out_channels, out_channels=config.fpn_channels, levels=config.fpn_levels)


__all__ = ["FPN", "SINGLE_LEVEL", "SingleLevelNeck", "build_fpn", "check_levels", "feature_levels_of"]
