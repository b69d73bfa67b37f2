"""Normalization layers for the backbone: frozen BatchNorm, BatchNorm, GroupNorm.

Three kinds, picked by ``Config.norm``:

- ``"frozen_bn"``: BatchNorm whose statistics and affine parameters are fixed
  constants. The standard choice with ImageNet weights, because detection batches
  (2 images per GPU) are too small to estimate batch statistics.
- ``"bn"``: ordinary ``nn.BatchNorm2d``; fine when the batch is large enough
  (the CPU preset trains 8 small images per step).
- ``"gn"``: ``nn.GroupNorm`` (Wu & He 2018), independent of the batch size; the
  choice for training from scratch with small batches.

All three expose ``weight`` and ``bias`` under the same names, so a torchvision
ResNet state dict maps onto any of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORM_KINDS = ("frozen_bn", "bn", "gn")
# GroupNorm paper default: 32 groups; narrow layers use fewer (see group_norm).
DEFAULT_NUM_GROUPS = 32
BATCHNORM_EPS = 1e-5  # torchvision's BatchNorm2d default, so ImageNet weights match


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    All four tensors are buffers (never trained, saved in the state dict with the
    same names as ``nn.BatchNorm2d``), so it equals an eval-mode BatchNorm2d.

    features: [N, C, H, W] -> [N, C, H, W]
    """

    def __init__(self, num_features: int, eps: float = BATCHNORM_EPS):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # BatchNorm2d checkpoints carry a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Fold the four vectors into one scale and one shift: a single fused multiply-add.
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)  # [C]
        shift = self.bias - self.running_mean * scale  # [C]
        return features * scale.view(1, -1, 1, 1).to(features.dtype) + shift.view(1, -1, 1, 1).to(
            features.dtype
        )

    @classmethod
    def from_batchnorm(cls, batchnorm: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        """A frozen copy of ``batchnorm`` (its running statistics and affine parameters)."""
        some_tensor = next(iter(batchnorm.state_dict().values()), torch.zeros(0))
        frozen = cls(batchnorm.num_features, eps=batchnorm.eps).to(some_tensor.device)
        if batchnorm.affine:
            frozen.weight.copy_(batchnorm.weight.detach())
            frozen.bias.copy_(batchnorm.bias.detach())
        if batchnorm.track_running_stats:
            frozen.running_mean.copy_(batchnorm.running_mean)
            frozen.running_var.copy_(batchnorm.running_var)
        return frozen

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def group_norm(channels: int, num_groups: int = DEFAULT_NUM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` groups, or the largest divisor of ``channels`` below it.

    A narrow backbone (16 stem channels) cannot split 16 channels into 32 groups;
    ``gcd`` keeps every group the same size.
    """
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


def make_norm(kind: str, channels: int) -> nn.Module:
    """A normalization layer of the given kind ("frozen_bn", "bn" or "gn") over ``channels``."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS)
    if kind == "gn":
        return group_norm(channels)
    raise ValueError(f"norm: unknown kind {kind!r}; expected one of {NORM_KINDS}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a FrozenBatchNorm2d; returns the module.

    Frozen stages use this so their statistics stop drifting in train mode.
    """
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        frozen_child = freeze_batchnorm(child)
        if frozen_child is not child:
            setattr(module, name, frozen_child)
    return module


__all__ = ["FrozenBatchNorm2d", "NORM_KINDS", "freeze_batchnorm", "group_norm", "make_norm"]
