"""RoIPool (Fast R-CNN, Girshick 2015): max pooling over a grid of quantized bins.

Shape shorthand:
    N: images, C: channels, H, W: feature map size
    K: RoIs, ph, pw: output (pooled) size

Semantics are torchvision's compiled kernel, including its arithmetic type: the corner
and bin arithmetic below runs in the input's dtype (float32 for float32 maps, float64 for
float64), as the C++/CUDA kernel does in its template type T. In float32, round(x * scale)
and floor(py * bin_h) can land on another integer than in float64 (with 28 x 28 bins and
scale 1/16 they often do), so computing in float64 would pick other pixels than torchvision:
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

from minimrcnn.ops._numba import (  # first: Numba set-up
    c_array, cuda_launch, image_order, lazy_kernels_per_float_type, unravel_cell,
)
from minimrcnn.ops._maps import CUDA_COMPUTE_DTYPES, check_maps, flat_maps, level_scales, level_table, split_flat
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
    """C's round(): 2.5 -> 3, -2.5 -> -3 (Python's round() gives 2 and -2).

    Exact in the value's own type: the fraction value - floor(value) is exact, whereas
    floor(value + 0.5) can round the sum up (0.49999997 + 0.5 is 1.0 in float32)."""
    magnitude = value if value >= 0 else -value
    whole = math.floor(magnitude)
    whole = whole + 1 if magnitude - whole >= 0.5 else whole
    return whole if value >= 0 else -whole


def roi_pool_bins(roi, height, width, output_size, spatial_scale=1.0, dtype=np.float64):
    """Yield (py, px, row_start, row_end, col_start, col_end) of every bin of one RoI (ends exclusive).

    dtype: the type the arithmetic runs in (torchvision's: the input's dtype); every
    product and quotient below is a NumPy scalar of that type.
    """
    real = np.dtype(dtype).type
    pooled_h, pooled_w = output_size
    scale = real(spatial_scale)
    start_x = round_half_away(real(roi[1]) * scale)
    start_y = round_half_away(real(roi[2]) * scale)
    end_x = round_half_away(real(roi[3]) * scale)
    end_y = round_half_away(real(roi[4]) * scale)
    roi_w = max(end_x - start_x + 1, 1)
    roi_h = max(end_y - start_y + 1, 1)
    bin_h, bin_w = real(roi_h) / real(pooled_h), real(roi_w) / real(pooled_w)
    for py in range(pooled_h):
        row_start = min(max(math.floor(real(py) * bin_h) + start_y, 0), height)
        row_end = min(max(math.ceil(real(py + 1) * bin_h) + start_y, 0), height)
        for px in range(pooled_w):
            col_start = min(max(math.floor(real(px) * bin_w) + start_x, 0), width)
            col_end = min(max(math.ceil(real(px + 1) * bin_w) + start_x, 0), width)
            yield py, px, row_start, row_end, col_start, col_end


def roi_pool_reference(features, rois, output_size, spatial_scale=1.0, dtype=None):
    """features: [N, C, H, W], rois: [K, 5] -> (output [K, C, ph, pw] float64, argmax int64).

    dtype: the type of the bin arithmetic; None: float32 for float32 rois, else float64
    (the values are compared in float64 either way: a max is exact).
    """
    if dtype is None:
        dtype = np.float32 if np.asarray(rois).dtype == np.float32 else np.float64
    features = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)  # exact for float32 rois: bins cast back to dtype
    _, channels, height, width = features.shape
    output = np.zeros((len(rois), channels) + tuple(output_size))
    argmax = np.full(output.shape, NO_ARGMAX, dtype=np.int64)
    for k, roi in enumerate(rois):
        image = features[int(roi[0])]  # [C, H, W]
        for py, px, row_start, row_end, col_start, col_end in roi_pool_bins(
            roi, height, width, output_size, spatial_scale, dtype
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


def _c_round(value):
    """C's round() of a float, exact in its type (see round_half_away), as an int."""
    magnitude = value if value >= 0 else -value
    whole = int(math.floor(magnitude))
    whole = whole + 1 if magnitude - whole >= 0.5 else whole
    return whole if value >= 0 else -whole


def _geometry_in(real, c_round):
    """RoIPool's corner and bin arithmetic in the float type `real` (np.float32 or np.float64).

    Every operand is cast to `real` explicitly: Numba types a Python float or an int
    quotient as float64, which would silently do the float32 kernel's arithmetic in float64
    (other bins than torchvision's, and half rate on a GPU). c_round is a C round jitted for
    the target the functions are compiled for: _c_round on CPU, _c_round_in(real) on CUDA.
    """

    def quantize_roi_axis(coord_start, coord_end, spatial_scale):
        """RoI corners along one axis -> (first pixel, size in pixels), both rounded (C's round)."""
        scale = real(spatial_scale)
        first = c_round(real(coord_start) * scale)
        last = c_round(real(coord_end) * scale)
        size = last - first + 1
        return first, size if size > 1 else 1  # (not max(): numba's CUDA target rejects max(a, b))

    def bin_range(p, roi_first, roi_size, pooled, limit):
        """Pixels [lo, hi) of bin p of a quantized RoI along one axis, clipped to [0, limit]."""
        bin_size = real(roi_size) / real(pooled)
        lo = int(math.floor(real(p) * bin_size)) + roi_first
        hi = int(math.ceil(real(p + 1) * bin_size)) + roi_first
        lo = 0 if lo < 0 else (limit if lo > limit else lo)
        hi = 0 if hi < 0 else (limit if hi > limit else hi)
        return lo, hi

    return quantize_roi_axis, bin_range


def _dispatch_on_precision(single_pair, double_pair):
    """(quantize, bin_range) taking a leading `single` flag: float32 arithmetic if set, else float64.
    Both branches return ints, so the float type of the locals never mixes."""
    quantize32, bin_range32 = single_pair
    quantize64, bin_range64 = double_pair

    def quantize_roi_axis(single, coord_start, coord_end, spatial_scale):
        if single:
            return quantize32(coord_start, coord_end, spatial_scale)
        return quantize64(coord_start, coord_end, spatial_scale)

    def bin_range(single, p, roi_first, roi_size, pooled, limit):
        if single:
            return bin_range32(p, roi_first, roi_size, pooled, limit)
        return bin_range64(p, roi_first, roi_size, pooled, limit)

    return quantize_roi_axis, bin_range


def _compile_geometry(jit):
    c_round = jit(_c_round)
    pairs = [tuple(jit(f) for f in _geometry_in(real, c_round)) for real in (np.float32, np.float64)]
    return tuple(jit(f) for f in _dispatch_on_precision(*pairs))


_quantize_cpu, _bin_range_cpu = _compile_geometry(numba.njit(cache=True))  # (the CUDA kernels': section 4)

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
def _forward_cpu(features_nhwc, rois, rois_by_image, spatial_scale, single, output, argmax):
    """features_nhwc: [N, H, W, C] contiguous; rois: [K, 5] float64 (exact copies of float32 ones);
    single: bin arithmetic in float32 (float32 maps); output, argmax: [K, C, ph, pw] (written)."""
    height, width, channels = features_nhwc.shape[1], features_nhwc.shape[2], features_nhwc.shape[3]
    pooled_h, pooled_w = output.shape[2], output.shape[3]
    num_bins = pooled_h * pooled_w
    flat, out_flat, argmax_flat = features_nhwc.reshape(-1), output.reshape(-1), argmax.reshape(-1)
    for task in numba.prange(rois.shape[0]):  # RoIs grouped by image, so neighbours share cache
        k = rois_by_image[task]
        b = int(rois[k, 0])
        first_x, size_x = _quantize_cpu(single, rois[k, 1], rois[k, 3], spatial_scale)
        first_y, size_y = _quantize_cpu(single, rois[k, 2], rois[k, 4], spatial_scale)
        best = np.empty((num_bins, channels), output.dtype)  # [ph*pw, C]
        best_index = np.empty((num_bins, channels), argmax.dtype)
        for py in range(pooled_h):
            row_start, row_end = _bin_range_cpu(single, py, first_y, size_y, pooled_h, height)
            for px in range(pooled_w):
                col_start, col_end = _bin_range_cpu(single, px, first_x, size_x, pooled_w, width)
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
        _forward_cpu(features_nhwc.numpy(), rois64, rois_by_image, spatial_scale, features.dtype == torch.float32,
                     output.numpy(), argmax.numpy())
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
#    One kernel per float type, with all its arithmetic in that type: the
#    float32 kernel's corners and bin edges are float32's, as torchvision's
#    kernel computes them in its type T (and a float32 kernel has no float64
#    operation; numba would type a Python float literal or an int-float mix as
#    float64). Compiled once per type for its launch signature (LazyKernel).
# ---------------------------------------------------------------------------


def _c_round_in(real):
    """_c_round with its constants and its subtraction in `real` (the same integer: for a
    value of type `real`, magnitude - floor(magnitude) is exact in that type)."""

    def c_round(value):
        magnitude = value if value >= real(0.0) else -value
        whole = int(math.floor(magnitude))
        whole = whole + 1 if magnitude - real(whole) >= real(0.5) else whole
        return whole if value >= real(0.0) else -whole

    return c_round


def _cuda_kernels_in(real):
    """The (forward, backward) Python functions of the CUDA kernels in float type `real`.

    One kernel serves one map and several (a pooler's FPN levels), as RoIAlign's: the maps
    travel as one flat buffer, level l's [N_l, C, H_l, W_l] block at offset level_table[l, 0],
    and each RoI carries its level index; argmax is row * W_l + col within the RoI's map.
    """
    quantize_roi_axis, bin_range = (
        cuda.jit(device=True)(f) for f in _geometry_in(real, cuda.jit(device=True)(_c_round_in(real)))
    )

    def forward(features, level_table, level_scales, rois, roi_levels, output, argmax):
        """features: [T] flat maps; level_table: [L, 3] int64 (offset, H_l, W_l); level_scales: [L];
        rois: [K, 5]; roi_levels: [K] int64 in [0, L); output, argmax: [K, C, ph, pw] (written)."""
        num_rois, channels, pooled_h, pooled_w = output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px = unravel_cell(index, channels, pooled_h, pooled_w)
            level = roi_levels[k]
            height, width = level_table[level, 1], level_table[level, 2]
            plane = level_table[level, 0] + (int(rois[k, 0]) * channels + c) * height * width
            first_x, size_x = quantize_roi_axis(rois[k, 1], rois[k, 3], level_scales[level])
            first_y, size_y = quantize_roi_axis(rois[k, 2], rois[k, 4], level_scales[level])
            row_lo, row_hi = bin_range(py, first_y, size_y, pooled_h, height)
            col_lo, col_hi = bin_range(px, first_x, size_x, pooled_w, width)
            if row_hi <= row_lo or col_hi <= col_lo:
                output[k, c, py, px] = real(0.0)
                argmax[k, c, py, px] = NO_ARGMAX
                continue
            best, best_index = real(-FLT_MAX), NO_ARGMAX
            for row in range(row_lo, row_hi):
                for col in range(col_lo, col_hi):
                    value = features[plane + row * width + col]
                    if value > best:  # strict: the first maximum wins ties
                        best, best_index = value, row * width + col
            output[k, c, py, px] = best
            argmax[k, c, py, px] = best_index

    def backward(grad_output, level_table, rois, roi_levels, argmax, grad_features):
        """grad_output, argmax: [K, C, ph, pw]; grad_features: [T] flat zeros (atomically added to)."""
        num_rois, channels, pooled_h, pooled_w = grad_output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px = unravel_cell(index, channels, pooled_h, pooled_w)
            pixel = argmax[k, c, py, px]
            if pixel != NO_ARGMAX:
                level = roi_levels[k]
                plane_size = level_table[level, 1] * level_table[level, 2]
                plane = level_table[level, 0] + (int(rois[k, 0]) * channels + c) * plane_size
                cuda.atomic.add(grad_features, plane + pixel, grad_output[k, c, py, px])

    return forward, backward


def _cuda_signature(real):
    """void(maps [T], level_table, level_scales, rois, roi_levels, output, argmax) and
    void(grad_output, level_table, rois, roi_levels, argmax, grad_maps [T])."""
    flat, table, rois = c_array(real, 1), c_array(np.int64, 2), c_array(real, 2)
    cells, argmax, levels = c_array(real, 4), c_array(np.int32, 4), c_array(np.int64, 1)
    return (numba.types.void(flat, table, flat, rois, levels, cells, argmax),
            numba.types.void(cells, table, rois, levels, argmax, flat))


CUDA_KERNELS = lazy_kernels_per_float_type(_cuda_kernels_in, _cuda_signature)  # torch dtype -> (forward, backward) LazyKernels


def _cuda_forward_levels(features, rois, roi_levels, params):
    """features: L maps; rois: [K, 5]; roi_levels: [K] int64 -> (output, argmax) [K, C, ph, pw], in
    the compute dtype (float32 for bf16/fp16 maps, read into float32 as they are gathered)."""
    (pooled_h, pooled_w), spatial_scales = params
    dtype, device = CUDA_COMPUTE_DTYPES[features[0].dtype], features[0].device
    shape = (rois.shape[0], features[0].shape[1], pooled_h, pooled_w)
    output = torch.empty(shape, dtype=dtype, device=device)
    argmax = torch.empty(shape, dtype=ARGMAX_DTYPE, device=device)
    if output.numel() > 0:
        table, _ = level_table([f.shape for f in features], device)
        inputs = (flat_maps([f.detach() for f in features], dtype), table,
                  level_scales(spatial_scales, dtype, device), rois.detach().to(dtype), roi_levels)
        cuda_launch(CUDA_KERNELS[dtype][0], output.numel(), inputs, (), (output, argmax), device)
    return output, argmax


def _cuda_backward_levels(grad_output, rois, roi_levels, argmax, feature_shapes):
    """-> one gradient per map, [N_l, C, H_l, W_l] views of one flat buffer (compute dtype)."""
    dtype, device = grad_output.dtype, grad_output.device
    table, total = level_table(feature_shapes, device)
    grad_flat = torch.zeros(total, dtype=dtype, device=device)
    if grad_output.numel() > 0:
        inputs = (grad_output.detach(), table, rois.detach().to(dtype), roi_levels, argmax)
        cuda_launch(CUDA_KERNELS[dtype][1], grad_output.numel(), inputs, (), (grad_flat,), device)
    return split_flat(grad_flat, feature_shapes)


def _cuda_forward(features, rois, params):
    output_size, spatial_scale = params
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return _cuda_forward_levels([features], rois, roi_levels, (output_size, (spatial_scale,)))


def _cuda_backward(grad_output, rois, argmax, feature_shape):
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    (grad,) = _cuda_backward_levels(grad_output, rois, roi_levels, argmax, [feature_shape])
    return grad


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


# ---------------------------------------------------------------------------
# 6b. Several maps at once: each RoI pooled from its own map (a pooler's FPN
#     levels). On CUDA one kernel launch for all maps; on CPU one roi_pool call
#     per map, exactly as roi_pool(features[l], rois[roi_levels == l], ...).
# ---------------------------------------------------------------------------


class _RoIPoolLevelsFunction(torch.autograd.Function):
    """The CUDA path of roi_pool_levels: one launch forward, one backward."""

    @staticmethod
    def forward(ctx, rois, roi_levels, params, *features):
        output, argmax = _cuda_forward_levels(list(features), rois, roi_levels, params)
        ctx.save_for_backward(rois, roi_levels, argmax)
        ctx.feature_shapes = [tuple(f.shape) for f in features]
        ctx.feature_dtypes = [f.dtype for f in features]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, roi_levels, argmax = ctx.saved_tensors
        grads = _cuda_backward_levels(grad_output.contiguous(), rois, roi_levels, argmax, ctx.feature_shapes)
        # (a map read in bf16 gets its gradient back in bf16, as a cast of the map would give it)
        return (None, None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.feature_dtypes)))


def roi_pool_levels(features, rois, roi_levels, output_size, spatial_scales, backend="auto"):
    """RoIPool of each RoI on its own map: RoI k is pooled from features[roi_levels[k]] at
    spatial_scales[roi_levels[k]]. On CUDA one kernel launch for all maps (a pooler's FPN levels).

    features: L tensors [N_l, C, H_l, W_l] (same C, dtype and device; on CUDA also bf16/fp16,
        read into float32 as the maps are gathered)
    rois: [K, 5] (batch_index into its own map, x1, y1, x2, y2); roi_levels: [K] int64 in [0, L)
    spatial_scales: L numbers; output_size, backend: as roi_pool's
    Returns: [K, C, ph, pw] in float32/float64 (the maps' type; float32 for bf16/fp16 maps),
    row k equal to roi_pool(features[l], rois[k:k+1], output_size, spatial_scales[l]).
    """
    pooled = output_size_pair(output_size)
    spatial_scales = tuple(check_spatial_scale(scale) for scale in spatial_scales)
    compute = check_maps(features, rois, roi_levels, spatial_scales, backend)
    backend = resolve_backend(backend, features[0])
    rois = rois.detach().to(compute)
    if backend == "cuda":
        check_cuda_backend(features[0].device)
        return _RoIPoolLevelsFunction.apply(rois, roi_levels, (pooled, spatial_scales), *features)
    output = features[0].new_zeros((rois.shape[0], features[0].shape[1], *pooled))
    for level, (level_features, spatial_scale) in enumerate(zip(features, spatial_scales)):
        rows = torch.nonzero(roi_levels == level).flatten()
        if rows.numel() > 0:
            output = output.index_copy(0, rows, roi_pool(level_features, rois[rows], pooled, spatial_scale, backend))
    return output
