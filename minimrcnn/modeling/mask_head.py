"""The mask head: a small FCN that predicts one M x M mask per thing class for each RoI.

Mask R-CNN's mask branch keeps the RoI's spatial layout all the way: a few 3x3
convolutions on the 14 x 14 RoIAlign features, a 2x transposed convolution to
28 x 28, and a 1x1 convolution to K mask logits, one per thing class. The loss is
a per-pixel sigmoid binary cross-entropy on the ground-truth class's channel only,
so classes never compete for a pixel: deciding the class is the box head's job.

Two ablations from the paper are switchable:
- ``mask_head="mlp"``: flatten and predict the K x M x M logits with FC layers
  (loses the pixel-to-pixel correspondence the FCN keeps);
- ``mask_class_agnostic=True``: a single mask channel shared by all classes;
- ``mask_loss="softmax"``: a per-pixel softmax across classes. We append a fixed
  zero logit as the background channel, so pixel p of a RoI of class c is trained
  towards class c where the target is 1 and towards background where it is 0,
  while all K class channels compete. With K = 1 this equals the sigmoid loss
  exactly (sigmoid(z) = softmax([0, z])[1]), so any difference is the competition.

Shape shorthand:
    R: RoIs (foreground RoIs in training, detections at test time)
    C: channels of the pooled features; S: pooled side (14)
    D: mask_head_dim; K: thing classes; M: mask resolution (28 or 14)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_HEADS = ("fcn", "mlp")
MASK_LOSSES = ("sigmoid", "softmax")
# Detectron2 initialises the final 1x1 mask predictor with a tiny normal.
MASK_LOGITS_INIT_STD = 0.001


class FCNMaskHead(nn.Module):
    """[R, C, S, S] -> mask logits [R, K, M, M] with M = S or 2 S."""

    def __init__(self, in_channels: int, pool_size: int, resolution: int, num_convs: int,
                 hidden_dim: int, num_thing_classes: int):
        super().__init__()
        if resolution not in (pool_size, 2 * pool_size):
            raise ValueError(
                f"mask resolution must be the pool size {pool_size} or twice it, got {resolution}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, hidden_dim, 3, padding=1), nn.ReLU(inplace=True)]
            channels = hidden_dim
        if resolution == 2 * pool_size:
            layers += [nn.ConvTranspose2d(channels, hidden_dim, 2, stride=2), nn.ReLU(inplace=True)]
            channels = hidden_dim
        self.layers = nn.Sequential(*layers)
        self.mask_logits = nn.Conv2d(channels, num_thing_classes, 1)
        for layer in self.layers:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.mask_logits.weight, std=MASK_LOGITS_INIT_STD)
        nn.init.zeros_(self.mask_logits.bias)

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        return self.mask_logits(self.layers(mask_features))


class MLPMaskHead(nn.Module):
    """The fully connected ablation: [R, C, S, S] -> flatten -> FC -> FC -> [R, K, M, M]."""

    def __init__(self, in_channels: int, pool_size: int, resolution: int, hidden_dim: int,
                 num_thing_classes: int):
        super().__init__()
        self.num_thing_classes = num_thing_classes
        self.resolution = resolution
        self.fc1 = nn.Linear(in_channels * pool_size * pool_size, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.mask_logits = nn.Linear(hidden_dim, num_thing_classes * resolution * resolution)
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.mask_logits.weight, std=MASK_LOGITS_INIT_STD)
        nn.init.zeros_(self.mask_logits.bias)

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc1(mask_features.flatten(1)))  # (R, C, S, S) -> (R, C*S*S) -> (R, D)
        hidden = F.relu(self.fc2(hidden))
        logits = self.mask_logits(hidden)  # (R, K*M*M)
        return logits.reshape(-1, self.num_thing_classes, self.resolution, self.resolution)


def select_class_channel(mask_logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The channel of each RoI's class. mask_logits: [R, K, M, M]; classes: [R] in 1..K -> [R, M, M]."""
    num_rois, num_classes = mask_logits.shape[:2]
    rows = torch.arange(num_rois, device=mask_logits.device)
    # (R, K, M, M) -> (R*K, M, M), row r*K + (c-1); index_select's backward is cheap.
    flat = mask_logits.reshape(num_rois * num_classes, *mask_logits.shape[2:])
    return flat.index_select(0, rows * num_classes + classes - 1)


def with_background_logit(mask_logits: torch.Tensor) -> torch.Tensor:
    """[R, K, M, M] -> [R, K+1, M, M] with a constant zero logit as channel 0 (background)."""
    background = mask_logits.new_zeros(mask_logits[:, :1].shape)
    return torch.cat([background, mask_logits], dim=1)


def shared_channel_classes(mask_logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The channel to read for each RoI: its class, or 1 for all when the head has a single
    (class-agnostic) channel. mask_logits: [R, K, M, M]; classes: [R] in 1..num_classes-1."""
    return classes if mask_logits.shape[1] > 1 else torch.ones_like(classes)


def mask_loss(
    mask_logits: torch.Tensor,
    gt_classes: torch.Tensor,
    mask_targets: torch.Tensor,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """The mask loss, averaged over the R x M x M pixels of the foreground RoIs.

    mask_logits: [R, K, M, M]; gt_classes: [R] int64 in 1..K; mask_targets: [R, M, M] in {0, 1}.
    "sigmoid": binary cross-entropy on the ground-truth class's channel only; the
    other K - 1 channels receive exactly zero gradient.
    "softmax": cross-entropy across [background, class 1..K] (see module docstring).
    """
    if loss_type not in MASK_LOSSES:
        raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {loss_type!r}")
    if gt_classes.numel() == 0:
        return mask_logits.sum().float() * 0.0
    mask_logits = mask_logits.float()  # float32 loss even under autocast
    gt_classes = shared_channel_classes(mask_logits, gt_classes)
    if loss_type == "sigmoid":
        gt_class_logits = select_class_channel(mask_logits, gt_classes)
        return F.binary_cross_entropy_with_logits(gt_class_logits, mask_targets.to(gt_class_logits.dtype))
    # Pixel target: the RoI's class inside the mask, background (0) outside it.
    pixel_classes = gt_classes[:, None, None] * (mask_targets > 0.5).to(torch.int64)
    return F.cross_entropy(with_background_logit(mask_logits), pixel_classes)


def mask_probabilities(
    mask_logits: torch.Tensor, classes: torch.Tensor, loss_type: str = "sigmoid"
) -> torch.Tensor:
    """Foreground probability of each RoI's (predicted) class: [R, K, M, M] -> [R, M, M]."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0,) + tuple(mask_logits.shape[2:]))
    classes = shared_channel_classes(mask_logits, classes)
    if loss_type == "softmax":
        probabilities = with_background_logit(mask_logits).softmax(dim=1)
        rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
        return probabilities[rows, classes]
    return select_class_channel(mask_logits, classes).sigmoid()


def build_mask_head(config, in_channels: int) -> nn.Module:
    # class-agnostic (Table 2b): one channel, read for every class (see shared_channel_classes)
    num_thing_classes = 1 if getattr(config, "mask_class_agnostic", False) else config.num_classes - 1
    if config.mask_head == "fcn":
        return FCNMaskHead(
            in_channels, config.mask_pool_size, config.mask_resolution,
            config.mask_head_num_convs, config.mask_head_dim, num_thing_classes,
        )
    if config.mask_head == "mlp":
        return MLPMaskHead(
            in_channels, config.mask_pool_size, config.mask_resolution,
            config.box_head_dim, num_thing_classes,  # as wide as the box head's FC layers
        )
    raise ValueError(f"mask_head must be one of {MASK_HEADS}, got {config.mask_head!r}")


__all__ = [
    "FCNMaskHead",
    "MLPMaskHead",
    "build_mask_head",
    "mask_loss",
    "mask_probabilities",
    "select_class_channel",
    "shared_channel_classes",
    "with_background_logit",
]
