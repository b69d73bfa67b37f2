"""Match predictions (anchors or proposals) to ground truth by IoU.

Shape shorthand: G: ground-truth boxes; P: predictions.
"""

from __future__ import annotations

import torch

IGNORE = -1
NEGATIVE = 0
POSITIVE = 1


class Matcher:
    """Give every prediction its best ground truth and a label from IoU intervals.

    With ``thresholds=[0.3, 0.7]`` and ``labels=[0, -1, 1]`` the intervals are
    [0, 0.3) -> 0 (background), [0.3, 0.7) -> -1 (ignored), [0.7, inf) -> 1 (foreground).

    ``allow_low_quality_matches`` (Faster R-CNN's RPN rule): for each ground truth, the
    predictions tied for its highest IoU become foreground even below the top threshold,
    so that no object is left without an anchor. A ground truth that overlaps nothing
    (best IoU 0) promotes nobody — otherwise every prediction would tie at 0.
    """

    def __init__(self, thresholds=(0.3, 0.7), labels=(NEGATIVE, IGNORE, POSITIVE),
                 allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if thresholds != sorted(thresholds):
            raise ValueError(f"thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"need {len(thresholds) + 1} labels for {len(thresholds)} thresholds")
        if any(label not in (NEGATIVE, IGNORE, POSITIVE) for label in labels):
            raise ValueError(f"labels must be in {{-1, 0, 1}}, got {labels}")
        self.thresholds = [-float("inf")] + thresholds + [float("inf")]
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """iou: [G, P] -> (matched_gt_index [P] int64, match_label [P] int8)."""
        if iou.dim() != 2:
            raise ValueError(f"iou must be a [G, P] matrix, got shape {list(iou.shape)}")
        num_predictions = iou.shape[1]
        if iou.shape[0] == 0:
            # No ground truth: everything is background (index 0 is a placeholder).
            matched = iou.new_zeros(num_predictions, dtype=torch.int64)
            label = iou.new_full((num_predictions,), self.labels[0], dtype=torch.int8)
            return matched, label

        best_iou, matched = iou.max(dim=0)  # [P], [P]
        label = torch.empty(num_predictions, dtype=torch.int8, device=iou.device)
        for low, high, interval_label in zip(self.thresholds[:-1], self.thresholds[1:], self.labels):
            in_interval = (best_iou >= low) & (best_iou < high)
            label[in_interval] = interval_label

        if self.allow_low_quality_matches:
            best_iou_per_gt = iou.max(dim=1, keepdim=True).values  # [G, 1]
            is_best = (iou == best_iou_per_gt) & (best_iou_per_gt > 0)  # [G, P]
            label[is_best.any(dim=0)] = POSITIVE
        return matched, label
