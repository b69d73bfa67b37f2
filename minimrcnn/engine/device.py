"""Choosing the device a command runs on (training, evaluation, pictures all share it)."""

from __future__ import annotations

import torch


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``; None picks CUDA when it is available, else the CPU.

    Asking for CUDA on a machine without it is an error rather than a silent fall-back
    to the CPU (a run would otherwise take a hundred times longer than planned).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")
    return device


__all__ = ["resolve_device"]
