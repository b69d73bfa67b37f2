"""Balanced sampling of foreground and background examples (anchors or proposals)."""

from __future__ import annotations

import torch


def subsample_labels(labels: torch.Tensor, num_samples: int, positive_fraction: float,
                     bg_label: int, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw at most ``num_samples`` examples, at most ``positive_fraction`` of them foreground.

    labels: [P] int64; -1 is ignored, ``bg_label`` is background, anything else foreground.
    Returns (positive_indices [p], negative_indices [n]) with p + n <= num_samples;
    background fills what foreground leaves.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {list(labels.shape)}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).flatten()
    negative = torch.nonzero(labels == bg_label).flatten()

    num_positive = min(int(num_samples * positive_fraction), positive.numel())
    num_negative = min(num_samples - num_positive, negative.numel())

    def pick(indices: torch.Tensor, count: int) -> torch.Tensor:
        order = torch.randperm(indices.numel(), generator=generator)[:count]
        return indices[order.to(indices.device)]

    return pick(positive, num_positive), pick(negative, num_negative)
