"""RoIPool (Fast R-CNN, Girshick 2015): max pooling over a grid of quantized bins.

Shape shorthand:
    N: images, C: channels, H, W: feature map size
    K: RoIs, ph, pw: output (pooled) size

Semantics are torchvision's compiled kernel:
    corners rounded with C rounding (halves away from zero): start = round(x1 * scale)
    roi size = max(end - start + 1, 1) (corners are inclusive pixel indices)
    bin (py, px) covers rows start + floor(py * bin_h) .. start + ceil((py + 1) * bin_h),
    clipped to [0, H] (and likewise columns); an empty bin outputs 0 (argmax -1);
    otherwise the max, found with a strict '>' starting from -FLT_MAX, so the first
    pixel in row-major order wins ties; argmax is stored as row * W + col.
The two roundings (corners, then bins) are what RoIAlign removes: see notebook 01.

The file reads top to bottom: NumPy reference (the spec) -> backends -> dispatch
-> autograd function -> public function and nn.Module.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from minimrcnn.ops._validate import (
    check_features_and_rois,
    check_spatial_scale,
    output_size_pair,
    resolve_backend,
)

FLT_MAX = float(np.finfo(np.float32).max)  # the max starts here, as in the C++ kernel
NO_ARGMAX = -1

# ---------------------------------------------------------------------------
# 1. NumPy reference.
# ---------------------------------------------------------------------------


def round_half_away(value):
    """C's round(): 2.5 -> 3, -2.5 -> -3 (Python's round() gives 2 and -2)."""
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


def _reference_bins(roi, height, width, output_size, spatial_scale):
    """Yield (py, px, row_start, row_end, col_start, col_end) of every bin of one RoI."""
    pooled_h, pooled_w = output_size
    start_x = round_half_away(roi[1] * spatial_scale)
    start_y = round_half_away(roi[2] * spatial_scale)
    end_x = round_half_away(roi[3] * spatial_scale)
    end_y = round_half_away(roi[4] * spatial_scale)
    roi_w = max(end_x - start_x + 1, 1)
    roi_h = max(end_y - start_y + 1, 1)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    for py in range(pooled_h):
        row_start = min(max(math.floor(py * bin_h) + start_y, 0), height)
        row_end = min(max(math.ceil((py + 1) * bin_h) + start_y, 0), height)
        for px in range(pooled_w):
            col_start = min(max(math.floor(px * bin_w) + start_x, 0), width)
            col_end = min(max(math.ceil((px + 1) * bin_w) + start_x, 0), width)
            yield py, px, row_start, row_end, col_start, col_end


def roi_pool_reference(features, rois, output_size, spatial_scale=1.0):
    """features: [N, C, H, W], rois: [K, 5] -> (output [K, C, ph, pw] float64, argmax int64)."""
    features = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    _, channels, height, width = features.shape
    output = np.zeros((len(rois), channels) + tuple(output_size))
    argmax = np.full(output.shape, NO_ARGMAX, dtype=np.int64)
    for k, roi in enumerate(rois):
        image = features[int(roi[0])]  # [C, H, W]
        for py, px, row_start, row_end, col_start, col_end in _reference_bins(
            roi, height, width, output_size, spatial_scale
        ):
            if row_end <= row_start or col_end <= col_start:
                continue  # empty bin: output 0, argmax -1
            best = np.full(channels, -FLT_MAX)
            best_index = np.full(channels, NO_ARGMAX)
            for row in range(row_start, row_end):
                for col in range(col_start, col_end):
                    better = image[:, row, col] > best  # strict: the first maximum wins ties
                    best[better] = image[better, row, col]
                    best_index[better] = row * width + col
            output[k, :, py, px] = best
            argmax[k, :, py, px] = best_index
    return output, argmax


def roi_pool_backward_reference(grad_output, rois, argmax, feature_shape):
    """Each output cell sends its gradient to the pixel that won its max."""
    grad_output = np.asarray(grad_output, dtype=np.float64)
    grad_features = np.zeros(feature_shape)
    width = feature_shape[3]
    num_rois, channels, pooled_h, pooled_w = grad_output.shape
    for k in range(num_rois):
        b = int(rois[k, 0])
        for c in range(channels):
            for py in range(pooled_h):
                for px in range(pooled_w):
                    index = argmax[k, c, py, px]
                    if index != NO_ARGMAX:
                        grad_features[b, c, index // width, index % width] += grad_output[k, c, py, px]
    return grad_features


# ---------------------------------------------------------------------------
# 2. Backends: forward(features, rois, params) -> (output, argmax) and
#    backward(grad_output, rois, argmax, feature_shape) -> grad_features,
#    where params = (output_size, spatial_scale).
# ---------------------------------------------------------------------------


def _reference_forward(features, rois, params):
    output, argmax = roi_pool_reference(features.detach().numpy(), rois.detach().numpy(), *params)
    return torch.from_numpy(output).to(features.dtype), torch.from_numpy(argmax)


def _reference_backward(grad_output, rois, argmax, feature_shape):
    grad = roi_pool_backward_reference(
        grad_output.detach().numpy(), rois.detach().numpy(), argmax.numpy(), feature_shape
    )
    return torch.from_numpy(grad).to(grad_output.dtype)


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "numba": (_reference_forward, _reference_backward),  # TEMPORARY until the kernels land
}


# ---------------------------------------------------------------------------
# 3. Autograd function and public API.
# ---------------------------------------------------------------------------


class _RoIPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, params, backend):
        forward_fn, _ = _BACKENDS[backend]
        output, argmax = forward_fn(features, rois, params)
        ctx.save_for_backward(rois, argmax)
        ctx.backend, ctx.feature_shape = backend, tuple(features.shape)
        ctx.mark_non_differentiable(argmax)
        return output, argmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_argmax):
        rois, argmax = ctx.saved_tensors
        _, backward_fn = _BACKENDS[ctx.backend]
        return backward_fn(grad_output, rois, argmax, ctx.feature_shape), None, None, None


def roi_pool(features, rois, output_size, spatial_scale=1.0, backend="auto", return_argmax=False):
    """Max-pool each RoI of a feature map over a grid of quantized bins.

    features: [N, C, H, W] float32 or float64
    rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in input-image coordinates, same dtype
    output_size: int or (ph, pw)
    spatial_scale: feature map size / input image size
    backend: "auto" (CUDA tensors -> "cuda", CPU -> "numba"), "reference", "numba", "cuda"
    return_argmax: also return argmax [K, C, ph, pw] int64 (row * W + col, -1 for empty bins)
    Returns: [K, C, ph, pw], differentiable w.r.t. features.
    """
    pooled = output_size_pair(output_size)
    spatial_scale = check_spatial_scale(spatial_scale)
    check_features_and_rois(features, rois)
    backend = resolve_backend(backend, features)
    output, argmax = _RoIPoolFunction.apply(features, rois, (pooled, spatial_scale), backend)
    return (output, argmax) if return_argmax else output


class RoIPool(nn.Module):
    """nn.Module wrapper of roi_pool; forward(features [N,C,H,W], rois [K,5]) -> [K,C,ph,pw]."""

    def __init__(self, output_size, spatial_scale=1.0, backend="auto"):
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = spatial_scale
        self.backend = backend

    def forward(self, features, rois):
        return roi_pool(features, rois, self.output_size, self.spatial_scale, self.backend)

    def extra_repr(self):
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, backend={self.backend!r}"
