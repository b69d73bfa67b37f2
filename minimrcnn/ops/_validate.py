"""Argument checks shared by roi_align and roi_pool.

Every check raises a TypeError (wrong kind of thing) or ValueError (right kind,
wrong value) whose message names the argument at fault, so that a mistake in a
model's wiring points at the call site instead of deep inside a kernel.
"""

import math
import os

import numpy as np
import torch

# The value checks of RoIs on a GPU read the RoIs back to the host (a device sync per op
# call). They run only when this is true (MINIMRCNN_DEBUG_CHECKS=1 in the environment, or
# set it here); on CPU tensors, where reading is free, they always run.
DEBUG_CHECKS = os.environ.get("MINIMRCNN_DEBUG_CHECKS", "0") not in ("", "0")

BACKENDS = ("auto", "reference", "numba", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float64)
ROI_COLUMNS = 5  # (batch_index, x1, y1, x2, y2)


def output_size_pair(output_size, name="output_size"):
    """An int or a pair of ints -> (pooled_height, pooled_width), both >= 1."""
    if isinstance(output_size, (int, np.integer)) and not isinstance(output_size, bool):
        pair = (int(output_size), int(output_size))
    elif isinstance(output_size, (tuple, list, torch.Size)) and len(output_size) == 2:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in output_size):
            raise TypeError(f"{name} must be an int or a pair of ints, got {output_size!r}")
        pair = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {output_size!r}")
    return pair


def check_spatial_scale(spatial_scale):
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"spatial_scale must be a number, got {type(spatial_scale).__name__}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"spatial_scale must be finite and positive, got {spatial_scale}")
    return float(spatial_scale)


def check_features_and_rois(features, rois):
    """features: [N, C, H, W] float32/float64; rois: [K, 5] same dtype and device.

    Checks the values of rois too (finite coordinates, integral batch indices in [0, N))
    on CPU tensors always, and on the GPU only with ``DEBUG_CHECKS`` (there it costs one
    device-to-host synchronization per call).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(rois, torch.Tensor):
        raise TypeError(f"rois must be a torch.Tensor, got {type(rois).__name__}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be float32 or float64, got {features.dtype}")
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W], got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != ROI_COLUMNS:
        raise ValueError(
            f"rois must be [K, 5] rows (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    if rois.dtype != features.dtype:
        raise TypeError(f"rois dtype {rois.dtype} must match features dtype {features.dtype}")
    if rois.device != features.device:
        raise ValueError(f"rois are on {rois.device} but features are on {features.device}")
    if rois.shape[0] == 0:
        return
    num_images = features.shape[0]
    if rois.device.type == "cpu":
        finite, index_ok = _roi_values_ok_cpu(rois, num_images)
    elif not DEBUG_CHECKS:
        return
    else:
        values = rois.detach()
        batch_index = values[:, 0]
        flags = torch.stack(
            [
                torch.isfinite(values).all(),
                ((batch_index >= 0) & (batch_index < num_images) & (batch_index == batch_index.floor())).all(),
            ]
        ).tolist()  # one synchronization for both checks
        finite, index_ok = flags
    if not finite:
        raise ValueError("rois must hold finite coordinates (found NaN or inf)")
    if not index_ok:
        raise ValueError(f"rois[:, 0] (batch index) must hold integers in [0, {num_images})")


def _roi_values_ok_cpu(rois, num_images):
    """(finite, batch indices integral and in range) of CPU rois [K, 5], read in NumPy."""
    values = rois.detach().numpy()
    finite = bool(np.isfinite(values).all())
    batch_index = values[:, 0]
    index_ok = finite and bool(
        ((batch_index >= 0) & (batch_index < num_images) & (batch_index == np.floor(batch_index))).all()
    )
    return finite, index_ok


def resolve_backend(backend, features):
    """'auto' -> 'cuda' for CUDA tensors, 'numba' for CPU tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cuda" if features.is_cuda else "numba"
    if backend in ("reference", "numba") and features.is_cuda:
        raise ValueError(f"backend {backend!r} runs on CPU tensors, but features are on {features.device}")
    return backend


def check_cuda_backend(device):
    """The "cuda" backend needs CUDA tensors, or CPU tensors under the CUDA simulator."""
    if device.type == "cuda":
        return
    import numba

    if not numba.config.ENABLE_CUDASIM:
        raise ValueError(
            f"backend 'cuda' needs CUDA tensors (features are on {device}); on CPU tensors it runs "
            "only under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before numba is imported)"
        )
