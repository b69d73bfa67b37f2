"""RoIAlign (Mask R-CNN, He et al. 2017, Sec. 3): bilinear sampling of a feature
map inside each region of interest, with no rounding of coordinates.

Shape shorthand:
    N: images, C: channels, H, W: feature map size
    K: RoIs, ph, pw: output (pooled) size, gh, gw: samples per bin along y, x

Semantics are torchvision's compiled kernel (also Detectron2's):
    start = x1 * spatial_scale - 0.5 if aligned else x1 * spatial_scale
    roi size clamped to >= 1 only when not aligned
    bin = roi_size / pooled; samples per bin = sampling_ratio, or ceil(roi_size / pooled) if <= 0
    sample (iy, ix) of bin (py, px) at start + p * bin + (i + 0.5) * bin / grid
    a sample outside [-1, H] x [-1, W] adds 0; inside, it is clamped to the map and
    interpolated bilinearly; each output cell is the mean of its bin's samples.

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

# ---------------------------------------------------------------------------
# 1. NumPy reference: loops that follow the semantics above line by line.
# ---------------------------------------------------------------------------


def _reference_bilinear_taps(y, x, height, width):
    """The (row, col, weight) of the up to four pixels that a sample at (y, x) reads."""
    if not (-1.0 <= y <= height and -1.0 <= x <= width):  # negated so that NaN lands here
        return []
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def _reference_sample_taps(roi, height, width, output_size, spatial_scale, sampling_ratio, aligned):
    """Yield (py, px, row, col, weight) for every pixel read by one RoI.

    weight already includes the 1 / count of the bin average, so that
    output[py, px] = sum weight * feature[row, col] over the taps of (py, px).
    """
    pooled_h, pooled_w = output_size
    offset = 0.5 if aligned else 0.0
    start_x = roi[1] * spatial_scale - offset
    start_y = roi[2] * spatial_scale - offset
    roi_w = roi[3] * spatial_scale - offset - start_x
    roi_h = roi[4] * spatial_scale - offset - start_y
    if not aligned:  # legacy behaviour: force malformed RoIs to be 1x1
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
    count = max(grid_h * grid_w, 1)
    for py in range(pooled_h):
        for px in range(pooled_w):
            for iy in range(grid_h):
                y = start_y + py * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_x + px * bin_w + (ix + 0.5) * bin_w / grid_w
                    for row, col, weight in _reference_bilinear_taps(y, x, height, width):
                        yield py, px, row, col, weight / count


def roi_align_reference(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """features: [N, C, H, W] array, rois: [K, 5] array -> [K, C, ph, pw] float64 array."""
    features = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    pooled_h, pooled_w = output_size
    _, channels, height, width = features.shape
    output = np.zeros((len(rois), channels, pooled_h, pooled_w))
    for k, roi in enumerate(rois):
        image = features[int(roi[0])]  # [C, H, W]
        taps = _reference_sample_taps(roi, height, width, output_size, spatial_scale, sampling_ratio, aligned)
        for py, px, row, col, weight in taps:
            output[k, :, py, px] += weight * image[:, row, col]
    return output


def roi_align_backward_reference(
    grad_output, rois, feature_shape, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
):
    """grad_output: [K, C, ph, pw] -> gradient w.r.t. features [N, C, H, W] (float64).

    Each tap of the forward pass sends weight * grad back to the pixel it read.
    """
    grad_output = np.asarray(grad_output, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    height, width = feature_shape[2], feature_shape[3]
    grad_features = np.zeros(feature_shape)
    for k, roi in enumerate(rois):
        grad_image = grad_features[int(roi[0])]  # a view: [C, H, W]
        taps = _reference_sample_taps(roi, height, width, output_size, spatial_scale, sampling_ratio, aligned)
        for py, px, row, col, weight in taps:
            grad_image[:, row, col] += weight * grad_output[k, :, py, px]
    return grad_features


# ---------------------------------------------------------------------------
# 2. Backends: each is a pair forward(features, rois, params) -> output and
#    backward(grad_output, rois, feature_shape, params) -> grad_features,
#    where params = (output_size, spatial_scale, sampling_ratio, aligned).
# ---------------------------------------------------------------------------


def _reference_forward(features, rois, params):
    output = roi_align_reference(features.detach().numpy(), rois.detach().numpy(), *params)
    return torch.from_numpy(output).to(features.dtype)


def _reference_backward(grad_output, rois, feature_shape, params):
    grad = roi_align_backward_reference(grad_output.detach().numpy(), rois.detach().numpy(), feature_shape, *params)
    return torch.from_numpy(grad).to(grad_output.dtype)


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "numba": (_reference_forward, _reference_backward),  # TEMPORARY until the kernels land
}


# ---------------------------------------------------------------------------
# 3. Autograd function and public API.
# ---------------------------------------------------------------------------


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, params, backend):
        ctx.save_for_backward(rois)
        ctx.params, ctx.backend, ctx.feature_shape = params, backend, tuple(features.shape)
        forward_fn, _ = _BACKENDS[backend]
        return forward_fn(features, rois, params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        _, backward_fn = _BACKENDS[ctx.backend]
        grad_features = backward_fn(grad_output, rois, ctx.feature_shape, ctx.params)
        return grad_features, None, None, None


def roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True, backend="auto"):
    """Bilinearly pool each RoI of a feature map to a fixed size.

    features: [N, C, H, W] float32 or float64
    rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in input-image coordinates, same dtype
    output_size: int or (ph, pw)
    spatial_scale: feature map size / input image size (e.g. 1/16 for stride 16)
    sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / output_size)
    aligned: shift by half a pixel so that pixel centres line up (Detectron2's fix)
    backend: "auto" (CUDA tensors -> "cuda", CPU -> "numba"), "reference", "numba", "cuda"
    Returns: [K, C, ph, pw], differentiable w.r.t. features.
    """
    pooled = output_size_pair(output_size)
    spatial_scale = check_spatial_scale(spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    check_features_and_rois(features, rois)
    backend = resolve_backend(backend, features)
    params = (pooled, spatial_scale, int(sampling_ratio), bool(aligned))
    return _RoIAlignFunction.apply(features, rois, params, backend)


class RoIAlign(nn.Module):
    """nn.Module wrapper of roi_align; forward(features [N,C,H,W], rois [K,5]) -> [K,C,ph,pw]."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True, backend="auto"):
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.backend = backend

    def forward(self, features, rois):
        return roi_align(
            features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, self.backend
        )

    def extra_repr(self):
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, backend={self.backend!r}"
        )
