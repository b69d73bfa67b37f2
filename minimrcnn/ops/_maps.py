"""Several feature maps as one: the layout the multi-map RoI ops share.

``roi_align_levels``, ``roi_pool_levels`` and ``roi_warp_levels`` pool each RoI from its own
map (an FPN pooler's levels, a batch's mask images). On CUDA the maps travel to one kernel
launch as one flat buffer: map l's [N_l, C, H_l, W_l] block, contiguous (NCHW), at offset
``level_table[l, 0]``, with its height and width beside it, and every RoI carries its map
index. This module builds that buffer and table and checks the arguments, once for all ops.
"""

import functools
import math

import numpy as np
import torch

LEVEL_TABLE_COLUMNS = 3  # (offset of the level's block in the flat buffer, H_l, W_l)
# Maps in another float type (bf16/fp16 under autocast) are read into a float32 buffer.
CUDA_COMPUTE_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                       torch.bfloat16: torch.float32, torch.float16: torch.float32}


def level_table(shapes, device):
    """[L, 3] int64 (offset, H_l, W_l) of maps of these [N_l, C, H_l, W_l] shapes, on `device`;
    and the flat size T. Cached: the pyramid has the same shapes every step."""
    return _cached_level_table(tuple(tuple(shape) for shape in shapes), device)


@functools.lru_cache(maxsize=64)
def _cached_level_table(shapes, device):
    rows, offset = [], 0
    for num_images, channels, height, width in shapes:
        rows.append((offset, height, width))
        offset += num_images * channels * height * width
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, LEVEL_TABLE_COLUMNS).to(device), offset


@functools.lru_cache(maxsize=64)
def level_scales(spatial_scales, dtype, device):
    """[L] spatial scales in the kernel's float type, on `device` (cached)."""
    return torch.tensor(spatial_scales, dtype=dtype).to(device)


def flat_maps(features, dtype):
    """L maps [N_l, C, H_l, W_l] -> one flat [T] buffer of `dtype`, each map contiguous (NCHW) at
    its level's offset. One map already contiguous in `dtype` is only viewed; otherwise every map
    is copied once, and a bf16 map is cast to float32 in that same copy."""
    if all(f.dtype == dtype and f.is_contiguous() for f in features):
        return features[0].reshape(-1) if len(features) == 1 else torch.cat([f.reshape(-1) for f in features])
    flat = torch.empty(sum(f.numel() for f in features), dtype=dtype, device=features[0].device)
    offset = 0
    for f in features:
        flat[offset:offset + f.numel()].view(f.shape).copy_(f)
        offset += f.numel()
    return flat


def check_maps(features, rois, roi_levels, spatial_scales, backend):
    """The arguments of a multi-map op (roi_align_levels, roi_pool_levels, roi_warp_levels);
    returns the float type the kernels compute in."""
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(f"features must be a non-empty list of [N_l, C, H_l, W_l] tensors, got {features!r}")
    if not all(isinstance(f, torch.Tensor) for f in features):
        raise TypeError("features must hold torch.Tensors only")
    first = features[0]
    on_cuda_backend = backend == "cuda" or (backend == "auto" and first.is_cuda)
    allowed = tuple(CUDA_COMPUTE_DTYPES) if on_cuda_backend else (torch.float32, torch.float64)
    for level, f in enumerate(features):
        if f.dim() != 4:
            raise ValueError(f"features[{level}] must be [N, C, H, W], got shape {tuple(f.shape)}")
        if f.dtype not in allowed:
            raise TypeError(f"features[{level}] must be one of {allowed}, got {f.dtype}")
        if (f.dtype, f.device, f.shape[1]) != (first.dtype, first.device, first.shape[1]):
            raise ValueError(f"features[{level}] ({f.dtype}, {f.device}, {f.shape[1]} channels) must match "
                             f"features[0] ({first.dtype}, {first.device}, {first.shape[1]} channels)")
    if len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales: expected {len(features)} (one per map), got {len(spatial_scales)}")
    if not isinstance(rois, torch.Tensor) or not rois.is_floating_point():
        raise TypeError(f"rois must be a float tensor, got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5] rows (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}")
    if not isinstance(roi_levels, torch.Tensor) or roi_levels.dtype != torch.int64:
        raise TypeError("roi_levels must be an int64 tensor")
    if roi_levels.shape != (rois.shape[0],):
        raise ValueError(f"roi_levels must be [K] (one per RoI, K = {rois.shape[0]}), got {tuple(roi_levels.shape)}")
    for name, tensor in (("rois", rois), ("roi_levels", roi_levels)):
        if tensor.device != first.device:
            raise ValueError(f"{name} are on {tensor.device} but features are on {first.device}")
    if first.device.type == "cpu" and rois.shape[0] > 0:  # values: read only where reading is free
        values, levels = rois.detach().numpy(), roi_levels.numpy()
        if not np.isfinite(values).all():
            raise ValueError("rois must hold finite coordinates (found NaN or inf)")
        if levels.min() < 0 or levels.max() >= len(features):
            raise ValueError(f"roi_levels must hold map indices in [0, {len(features)})")
        batch_index, num_images = values[:, 0], np.array([f.shape[0] for f in features])[levels]
        bad = np.nonzero((batch_index < 0) | (batch_index >= num_images) | (batch_index != np.floor(batch_index)))[0]
        if bad.size > 0:
            raise ValueError(f"rois[{bad[0]}, 0] (batch index {batch_index[bad[0]]:g}) must be an integer in "
                             f"[0, {num_images[bad[0]]}) (the images of features[{levels[bad[0]]}])")
    compute = CUDA_COMPUTE_DTYPES[first.dtype]
    return compute

def split_flat(flat, shapes):
    """The inverse of ``flat_maps`` for a gradient: one [N_l, C, H_l, W_l] view per shape of the
    flat [T] buffer, in order (no copies)."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset:offset + size].view(shape))
        offset += size
    return views


__all__ = ["CUDA_COMPUTE_DTYPES", "LEVEL_TABLE_COLUMNS", "check_maps", "flat_maps", "level_scales", "level_table",
           "split_flat"]
