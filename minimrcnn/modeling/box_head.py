"""The box head: two fully connected layers, then class logits and class-specific box deltas.

Each pooled RoI is flattened and passed through two FC layers (1024 wide at full
scale). A linear layer scores the K + 1 classes (background is class 0); another
predicts one box refinement per thing class (4 K deltas, Fast R-CNN's
class-specific regression), so the delta used for a RoI is the one of its class.

Shape shorthand:
    R: RoIs
    C, S: channels and side of the pooled features
    K: thing classes (num_classes - 1); K + 1 logits count the background
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimrcnn.ops.boxes import BOX_LOSSES

# Detectron2's initialisation of the two predictors: small, so training starts from
# uniform class scores and from the proposals' own boxes.
CLASS_LOGITS_INIT_STD = 0.01
BOX_DELTAS_INIT_STD = 0.001
# Smooth-L1's switch point from quadratic to linear (Fast R-CNN uses 1; on deltas
# scaled by the (10, 10, 5, 5) weights a smaller beta is common; 0 is plain L1).
SMOOTH_L1_BETA = 1.0


class BoxHead(nn.Module):
    """Pooled RoI features [R, C, S, S] -> (class_logits [R, K+1], box_deltas [R, 4K])."""

    def __init__(self, in_channels: int, pool_size: int, hidden_dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must count the background and >= 1 thing, got {num_classes}")
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_channels * pool_size * pool_size, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.class_logits = nn.Linear(hidden_dim, num_classes)
        self.box_deltas = nn.Linear(hidden_dim, 4 * (num_classes - 1))
        for layer in (self.fc1, self.fc2):
            # "Xavier" as Caffe2 defines it (uniform, fan-in): Detectron2's choice for FC layers.
            nn.init.kaiming_uniform_(layer.weight, a=1)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.class_logits.weight, std=CLASS_LOGITS_INIT_STD)
        nn.init.normal_(self.box_deltas.weight, std=BOX_DELTAS_INIT_STD)
        nn.init.zeros_(self.class_logits.bias)
        nn.init.zeros_(self.box_deltas.bias)

    def forward(self, box_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = box_features.flatten(1)  # (R, C, S, S) -> (R, C*S*S)
        hidden = F.relu(self.fc1(hidden))
        hidden = F.relu(self.fc2(hidden))
        return self.class_logits(hidden), self.box_deltas(hidden)


def select_class_deltas(box_deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The 4 deltas of each RoI's class. box_deltas: [R, 4K]; classes: [R] in 1..K -> [R, 4]."""
    per_class = box_deltas.reshape(box_deltas.shape[0], box_deltas.shape[1] // 4, 4)  # (R, 4K) -> (R, K, 4)
    rows = torch.arange(box_deltas.shape[0], device=box_deltas.device)
    return per_class[rows, classes - 1]


def box_head_losses(
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    gt_classes: torch.Tensor,
    regression_targets: torch.Tensor,
    box_loss: str = "l1",
    classifier_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Fast R-CNN's two losses over the sampled RoIs.

    class_logits: [R, K+1]; box_deltas: [R, 4K]; gt_classes: [R] int64 (0 = background);
    regression_targets: [R, 4] encoded deltas (only foreground rows are read).

    loss_classifier: cross-entropy averaged over all R sampled RoIs, times ``classifier_weight``
    (1 in the paper; the loss is returned, and logged, weighted).
    loss_box: L1 (or smooth-L1) of the foreground RoIs' ground-truth-class deltas,
    summed and divided by R, so each RoI weighs the same whatever the foreground share.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    num_rois = gt_classes.numel()
    if num_rois == 0:
        # Keep the graph connected so backward() still works on an empty batch.
        zero = class_logits.sum() * 0.0 + box_deltas.sum() * 0.0
        return {"loss_classifier": zero, "loss_box": zero}
    # Losses in float32 even when the head ran under autocast.
    class_logits, box_deltas = class_logits.float(), box_deltas.float()
    loss_classifier = F.cross_entropy(class_logits, gt_classes) * classifier_weight
    foreground = torch.nonzero(gt_classes > 0).squeeze(1)
    pred_deltas = select_class_deltas(box_deltas[foreground], gt_classes[foreground])
    target_deltas = regression_targets[foreground]
    if box_loss == "l1":
        loss_box = F.l1_loss(pred_deltas, target_deltas, reduction="sum")
    else:
        loss_box = F.smooth_l1_loss(pred_deltas, target_deltas, beta=SMOOTH_L1_BETA, reduction="sum")
    # With no foreground the sum over an empty selection is a differentiable zero.
    loss_box = loss_box / num_rois
    return {"loss_classifier": loss_classifier, "loss_box": loss_box}


def build_box_head(config, in_channels: int) -> BoxHead:
    return BoxHead(in_channels, config.box_pool_size, config.box_head_dim, config.num_classes)


__all__ = [
    "BoxHead",
    "box_head_losses",
    "build_box_head",
    "select_class_deltas",
]
