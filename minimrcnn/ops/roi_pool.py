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

The file reads top to bottom: 1. NumPy reference (the spec) -> 2. helpers shared by
CPU and CUDA -> 3. Numba CPU kernels -> 4. numba.cuda kernels -> 5. dispatch ->
6. autograd function, public function and nn.Module.
"""

import math

import numba
import numpy as np
import torch
from numba import cuda
from torch import nn
from torch.autograd.function import once_differentiable

from minimrcnn.ops._numba import cuda_launch, image_order, unravel_cell  # first: Numba set-up
from minimrcnn.ops._validate import (
    check_cuda_backend,
    check_features_and_rois,
    check_spatial_scale,
    output_size_pair,
    resolve_backend,
)

FLT_MAX = float(np.finfo(np.float32).max)  # the max starts here, as in the C++ kernel
NO_ARGMAX = -1
ARGMAX_DTYPE = torch.int32  # row * W + col; int32 like torchvision: half the memory of int64

# ---------------------------------------------------------------------------
# 1. NumPy reference.
# ---------------------------------------------------------------------------


def round_half_away(value):
    """C's round(): 2.5 -> 3, -2.5 -> -3 (Python's round() gives 2 and -2)."""
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


def roi_pool_bins(roi, height, width, output_size, spatial_scale=1.0):
    """Yield (py, px, row_start, row_end, col_start, col_end) of every bin of one RoI (ends exclusive)."""
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
        for py, px, row_start, row_end, col_start, col_end in roi_pool_bins(
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
# 2. Helpers shared by the CPU and CUDA kernels (plain Python, compiled twice).
# ---------------------------------------------------------------------------


def quantize_roi_axis(coord_start, coord_end, spatial_scale):
    """RoI corners along one axis -> (first pixel, size in pixels), both rounded (C's round)."""
    scaled_start = coord_start * spatial_scale
    scaled_end = coord_end * spatial_scale
    first = math.floor(scaled_start + 0.5) if scaled_start >= 0 else -math.floor(-scaled_start + 0.5)
    last = math.floor(scaled_end + 0.5) if scaled_end >= 0 else -math.floor(-scaled_end + 0.5)
    size = int(last) - int(first) + 1
    return int(first), size if size > 1 else 1  # (not max(): numba's CUDA target rejects max(a, b))


def bin_range(p, roi_first, roi_size, pooled, limit):
    """Pixels [lo, hi) of bin p of a quantized RoI along one axis, clipped to [0, limit]."""
    bin_size = roi_size / pooled
    lo = int(math.floor(p * bin_size)) + roi_first
    hi = int(math.ceil((p + 1) * bin_size)) + roi_first
    lo = 0 if lo < 0 else (limit if lo > limit else lo)
    hi = 0 if hi < 0 else (limit if hi > limit else hi)
    return lo, hi


_quantize_cpu = numba.njit(cache=True)(quantize_roi_axis)
_bin_range_cpu = numba.njit(cache=True)(bin_range)
_quantize_cuda = cuda.jit(device=True)(quantize_roi_axis)
_bin_range_cuda = cuda.jit(device=True)(bin_range)

# ---------------------------------------------------------------------------
# 3. Numba CPU kernels. The forward reads the map channels-last ([N, H, W, C]) so
#    that the max runs over contiguous channels (SIMD compare-and-select), with
#    the bin bounds computed once per RoI; the backward is race-free.
# ---------------------------------------------------------------------------

BACKWARD_CHANNEL_BLOCK = 16  # channels per backward task (image, channel block)
# Unsigned flat indices: Numba wraps negative signed indices around (a[-1]), and
# that check keeps the inner loops from vectorizing.
_unsigned = np.uint64


@numba.njit(parallel=True, cache=True)
def _forward_cpu(features_nhwc, rois, rois_by_image, spatial_scale, output, argmax):
    """features_nhwc: [N, H, W, C] contiguous; rois: [K, 5] float64; output, argmax: [K, C, ph, pw] (written)."""
    height, width, channels = features_nhwc.shape[1], features_nhwc.shape[2], features_nhwc.shape[3]
    pooled_h, pooled_w = output.shape[2], output.shape[3]
    num_bins = pooled_h * pooled_w
    flat, out_flat, argmax_flat = features_nhwc.reshape(-1), output.reshape(-1), argmax.reshape(-1)
    for task in numba.prange(rois.shape[0]):  # RoIs grouped by image, so neighbours share cache
        k = rois_by_image[task]
        b = int(rois[k, 0])
        first_x, size_x = _quantize_cpu(rois[k, 1], rois[k, 3], spatial_scale)
        first_y, size_y = _quantize_cpu(rois[k, 2], rois[k, 4], spatial_scale)
        best = np.empty((num_bins, channels), output.dtype)  # [ph*pw, C]
        best_index = np.empty((num_bins, channels), argmax.dtype)
        for py in range(pooled_h):
            row_start, row_end = _bin_range_cpu(py, first_y, size_y, pooled_h, height)
            for px in range(pooled_w):
                col_start, col_end = _bin_range_cpu(px, first_x, size_x, pooled_w, width)
                top, top_index = best[py * pooled_w + px], best_index[py * pooled_w + px]
                empty = row_end <= row_start or col_end <= col_start
                top[:] = 0.0 if empty else -FLT_MAX
                top_index[:] = NO_ARGMAX
                for row in range(row_start, row_end):
                    for col in range(col_start, col_end):
                        pixel = row * width + col
                        start = _unsigned(((b * height + row) * width + col) * channels)
                        for c in range(_unsigned(channels)):
                            value = flat[start + c]
                            better = value > top[c]  # strict: the first maximum wins ties
                            top[c] = value if better else top[c]
                            top_index[c] = pixel if better else top_index[c]
        first = _unsigned(k * channels * num_bins)  # [ph*pw, C] -> output[k] ([C, ph, pw])
        best_flat, index_flat = best.reshape(-1), best_index.reshape(-1)
        for c in range(_unsigned(channels)):
            for j in range(_unsigned(num_bins)):
                out_flat[first + c * _unsigned(num_bins) + j] = best_flat[j * _unsigned(channels) + c]
                argmax_flat[first + c * _unsigned(num_bins) + j] = index_flat[j * _unsigned(channels) + c]


@numba.njit(parallel=True, cache=True)
def _backward_cpu(grad_output, rois_by_image, image_offsets, argmax, grad_features):
    """grad_output, argmax: [K, C, ph, pw] contiguous; grad_features: [N, C, H, W] zeros.

    Race-free: a task owns one (image, channel block) slice of grad_features and
    visits that image's RoIs one after the other.
    """
    num_images, channels = grad_features.shape[0], grad_features.shape[1]
    plane_size = grad_features.shape[2] * grad_features.shape[3]
    num_bins = grad_output.shape[2] * grad_output.shape[3]
    grad_flat, argmax_flat, out_flat = grad_output.reshape(-1), argmax.reshape(-1), grad_features.reshape(-1)
    num_blocks = (channels + BACKWARD_CHANNEL_BLOCK - 1) // BACKWARD_CHANNEL_BLOCK
    for task in numba.prange(num_images * num_blocks):
        n, c0 = task // num_blocks, (task % num_blocks) * BACKWARD_CHANNEL_BLOCK
        for r in range(image_offsets[n], image_offsets[n + 1]):
            k = rois_by_image[r]
            for c in range(c0, min(c0 + BACKWARD_CHANNEL_BLOCK, channels)):
                plane = _unsigned((n * channels + c) * plane_size)
                cell = _unsigned((k * channels + c) * num_bins)
                for j in range(_unsigned(num_bins)):
                    index = argmax_flat[cell + j]
                    if index != NO_ARGMAX:
                        out_flat[plane + _unsigned(index)] += grad_flat[cell + j]


def _numba_forward(features, rois, params):
    (pooled_h, pooled_w), spatial_scale = params
    shape = (rois.shape[0], features.shape[1], pooled_h, pooled_w)
    output = torch.empty(shape, dtype=features.dtype)
    argmax = torch.empty(shape, dtype=ARGMAX_DTYPE)
    if output.numel() > 0:
        features_nhwc = features.detach().permute(0, 2, 3, 1)
        if not features_nhwc.is_contiguous():  # free when features are already channels_last
            features_nhwc = features_nhwc.contiguous()
        rois64 = rois.detach().numpy().astype(np.float64)
        rois_by_image, _ = image_order(rois64, features.shape[0])
        _forward_cpu(features_nhwc.numpy(), rois64, rois_by_image, spatial_scale, output.numpy(), argmax.numpy())
    return output, argmax


def _numba_backward(grad_output, rois, argmax, feature_shape):
    grad_features = torch.zeros(feature_shape, dtype=grad_output.dtype)
    if grad_output.numel() > 0:
        rois_by_image, image_offsets = image_order(rois.detach().numpy().astype(np.float64), feature_shape[0])
        _backward_cpu(grad_output.detach().contiguous().numpy(), rois_by_image, image_offsets,
                      argmax.contiguous().numpy(), grad_features.numpy())
    return grad_features


# ---------------------------------------------------------------------------
# 4. CUDA kernels (numba.cuda): one thread per output cell; atomics in backward.
# ---------------------------------------------------------------------------


@cuda.jit
def _forward_cuda(features, rois, spatial_scale, output, argmax):
    num_rois, channels, pooled_h, pooled_w = output.shape
    height, width = features.shape[2], features.shape[3]
    for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
        k, c, py, px = unravel_cell(index, channels, pooled_h, pooled_w)
        b = int(rois[k, 0])
        first_x, size_x = _quantize_cuda(rois[k, 1], rois[k, 3], spatial_scale)
        first_y, size_y = _quantize_cuda(rois[k, 2], rois[k, 4], spatial_scale)
        row_lo, row_hi = _bin_range_cuda(py, first_y, size_y, pooled_h, height)
        col_lo, col_hi = _bin_range_cuda(px, first_x, size_x, pooled_w, width)
        if row_hi <= row_lo or col_hi <= col_lo:
            output[k, c, py, px] = 0.0
            argmax[k, c, py, px] = NO_ARGMAX
            continue
        best, best_index = -FLT_MAX, NO_ARGMAX
        for row in range(row_lo, row_hi):
            for col in range(col_lo, col_hi):
                if features[b, c, row, col] > best:
                    best, best_index = features[b, c, row, col], row * width + col
        output[k, c, py, px] = best
        argmax[k, c, py, px] = best_index


@cuda.jit
def _backward_cuda(grad_output, rois, argmax, grad_features):
    num_rois, channels, pooled_h, pooled_w = grad_output.shape
    width = grad_features.shape[3]
    for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
        k, c, py, px = unravel_cell(index, channels, pooled_h, pooled_w)
        pixel = argmax[k, c, py, px]
        if pixel != NO_ARGMAX:
            row, col = pixel // width, pixel % width
            cuda.atomic.add(grad_features, (int(rois[k, 0]), c, row, col), grad_output[k, c, py, px])


def _cuda_forward(features, rois, params):
    (pooled_h, pooled_w), spatial_scale = params
    shape = (rois.shape[0], features.shape[1], pooled_h, pooled_w)
    output = torch.empty(shape, dtype=features.dtype, device=features.device)
    argmax = torch.empty(shape, dtype=ARGMAX_DTYPE, device=features.device)
    if output.numel() > 0:
        cuda_launch(_forward_cuda, output.numel(), (features.detach(), rois.detach()), (spatial_scale,),
                    (output, argmax), features.device)
    return output, argmax


def _cuda_backward(grad_output, rois, argmax, feature_shape):
    grad_features = torch.zeros(feature_shape, dtype=grad_output.dtype, device=grad_output.device)
    if grad_output.numel() > 0:
        cuda_launch(_backward_cuda, grad_output.numel(), (grad_output.detach().contiguous(), rois.detach(), argmax), (),
                    (grad_features,), grad_output.device)
    return grad_features


# ---------------------------------------------------------------------------
# 5. Dispatch: forward(features, rois, params) -> (output, argmax) and
#    backward(grad_output, rois, argmax, feature_shape) -> grad_features,
#    where params = (output_size, spatial_scale).
# ---------------------------------------------------------------------------


def _reference_forward(features, rois, params):
    output, argmax = roi_pool_reference(features.detach().numpy(), rois.detach().numpy(), *params)
    return torch.from_numpy(output).to(features.dtype), torch.from_numpy(argmax).to(ARGMAX_DTYPE)


def _reference_backward(grad_output, rois, argmax, feature_shape):
    grad = roi_pool_backward_reference(
        grad_output.detach().numpy(), rois.detach().numpy(), argmax.numpy(), feature_shape
    )
    return torch.from_numpy(grad).to(grad_output.dtype)


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "numba": (_numba_forward, _numba_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}


# ---------------------------------------------------------------------------
# 6. Autograd function and public API.
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
    return_argmax: also return argmax [K, C, ph, pw] int32 (row * W + col, -1 for empty bins)
    Returns: [K, C, ph, pw], differentiable w.r.t. features.
    """
    pooled = output_size_pair(output_size)
    spatial_scale = check_spatial_scale(spatial_scale)
    check_features_and_rois(features, rois)
    backend = resolve_backend(backend, features)
    if backend == "cuda":
        check_cuda_backend(features.device)
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
