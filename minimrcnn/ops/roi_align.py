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
    a sample outside [-1, H] x [-1, W] adds 0 (it is not read); inside, it is clamped to the map and
    interpolated bilinearly; each output cell is the mean of its bin's samples.

The file reads top to bottom: 1. NumPy reference (the spec) -> 2. scalar helpers
shared by CPU and CUDA -> 3. Numba CPU kernels -> 4. numba.cuda kernels -> 5. dispatch
-> 6. autograd function, public function and nn.Module -> 7. checks of a backend
against the reference (also of the CUDA kernels under the simulator).
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


def roi_align_sample_points(roi, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
    """(y, x) of every sample of one RoI on the feature map, before any bounds check.

    roi: (batch_index, x1, y1, x2, y2) -> array [ph, pw, gh * gw, 2]; for pictures and lessons.
    """
    pooled_h, pooled_w = output_size
    start_y, start_x, bin_h, bin_w, grid_h, grid_w, _ = roi_geometry(
        roi[1], roi[2], roi[3], roi[4], pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
    )
    points = np.zeros((pooled_h, pooled_w, max(grid_h, 0) * max(grid_w, 0), 2))
    for py in range(pooled_h):
        for px in range(pooled_w):
            for iy in range(grid_h):
                for ix in range(grid_w):
                    points[py, px, iy * grid_w + ix] = (
                        start_y + py * bin_h + (iy + 0.5) * bin_h / grid_h,
                        start_x + px * bin_w + (ix + 0.5) * bin_w / grid_w,
                    )
    return points


# ---------------------------------------------------------------------------
# 2. Helpers shared by the CPU and CUDA kernels: plain Python functions,
#    compiled once with numba.njit and once as CUDA device functions.
# ---------------------------------------------------------------------------


def roi_geometry(roi_x1, roi_y1, roi_x2, roi_y2, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    """-> (start_y, start_x, bin_h, bin_w, grid_h, grid_w, count) of one RoI on the feature map."""
    offset = 0.5 if aligned else 0.0
    start_x = roi_x1 * spatial_scale - offset
    start_y = roi_y1 * spatial_scale - offset
    roi_w = roi_x2 * spatial_scale - offset - start_x
    roi_h = roi_y2 * spatial_scale - offset - start_y
    # (conditional expressions rather than max(): numba's CUDA target rejects max(a, b))
    if not aligned:
        roi_w = roi_w if roi_w > 1.0 else 1.0
        roi_h = roi_h if roi_h > 1.0 else 1.0
    grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / pooled_h))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / pooled_w))
    count = grid_h * grid_w if grid_h * grid_w > 1 else 1
    return start_y, start_x, roi_h / pooled_h, roi_w / pooled_w, grid_h, grid_w, count


def linear_interpolation_1d(coord, size):
    """Where a sample at `coord` reads along one axis of length `size`: (low, high, w_low, w_high).

    Bilinear interpolation is the product of one such 1-D interpolation along y
    and one along x, so the four taps' weights are w_y * w_x. Outside [-1, size]
    both weights are 0, which makes the whole sample contribute 0.
    """
    if not (coord >= -1.0 and coord <= size):  # negated so that NaN lands here
        return 0, 0, 0.0, 0.0
    if coord < 0.0:
        coord = 0.0
    low = int(coord)
    if low >= size - 1:
        return size - 1, size - 1, 1.0, 0.0
    frac = coord - low
    return low, low + 1, 1.0 - frac, frac


_roi_geometry_cpu = numba.njit(cache=True)(roi_geometry)
_interp_cpu = numba.njit(cache=True)(linear_interpolation_1d)

# ---------------------------------------------------------------------------
# 3. Numba CPU kernels. Features are read channels-last ([N, H, W, C]) so that
#    the innermost loop runs over contiguous channels (SIMD), while the
#    interpolation tables are computed once per RoI and shared by all channels.
# ---------------------------------------------------------------------------

# Channels per forward task. Whole 256-channel rows were fastest in our measurements: the
# per-RoI tables are shared by more channels, and the [ph*pw, block] -> [block, ph, pw]
# transposition of the result reads each cache line fully.
CHANNEL_BLOCK = 256
BACKWARD_MAX_BLOCK = 64  # channels per backward task (image, block), at most


@numba.njit(cache=True)
def _axis_tables(start, bin_size, grid, pooled, size, dtype_like):
    """Taps of every sample along one axis: low[p * grid + i], high, w_low, w_high."""
    num = max(pooled * grid, 0)
    low = np.empty(num, np.int64)
    high = np.empty(num, np.int64)
    w_low = np.empty(num, dtype_like.dtype)
    w_high = np.empty(num, dtype_like.dtype)
    for p in range(pooled):
        for i in range(grid):
            coord = start + p * bin_size + (i + 0.5) * bin_size / grid
            j = p * grid + i
            low[j], high[j], w_low[j], w_high[j] = _interp_cpu(coord, size)
    return low, high, w_low, w_high


# Only 'contract' of the fast-math flags: fused multiply-adds (one rounding instead of
# two, so last-bit differences from unfused arithmetic); NaN/inf handling and the
# summation order are untouched.
_FAST = {"contract"}
# Unsigned indices: Numba wraps negative signed indices around (a[-1]), and that
# check turns the contiguous inner loop into slow gathers.
_unsigned = np.uint64


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _forward_cpu(features_nhwc, rois, rois_by_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                 output):
    """features_nhwc: [N, H, W, C] contiguous; rois: [K, 5] float64; output: [K, C, ph, pw] (written).

    Tasks run channel block by channel block, and within a block image by image
    (rois_by_image), so that consecutive tasks of a thread read the same slab
    of the feature map ([H, W, block] of one image), which stays in cache.
    """
    num_rois = rois.shape[0]
    height, width, channels = features_nhwc.shape[1], features_nhwc.shape[2], features_nhwc.shape[3]
    flat = features_nhwc.reshape(-1)  # flat indices keep the inner loop free of slicing overhead
    num_blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for task in numba.prange(num_rois * num_blocks):  # task = (channel block, RoI)
        k, c0 = rois_by_image[task % num_rois], (task // num_rois) * CHANNEL_BLOCK
        block = min(c0 + CHANNEL_BLOCK, channels) - c0
        b = int(rois[k, 0])
        start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry_cpu(
            rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned
        )
        y_low, y_high, wy_low, wy_high = _axis_tables(start_y, bin_h, grid_h, pooled_h, height, output)
        x_low, x_high, wx_low, wx_high = _axis_tables(start_x, bin_w, grid_w, pooled_w, width, output)
        bins = np.zeros((pooled_h * pooled_w, block), output.dtype)  # [ph*pw, block]
        for py in range(pooled_h):
            for px in range(pooled_w):
                acc = bins[py * pooled_w + px]
                for iy in range(py * grid_h, (py + 1) * grid_h):
                    if wy_low[iy] == 0 and wy_high[iy] == 0:
                        continue  # samples outside the map add nothing (and 0 * inf would be NaN)
                    row_low = (b * height + y_low[iy]) * width
                    row_high = (b * height + y_high[iy]) * width
                    for ix in range(px * grid_w, (px + 1) * grid_w):
                        if wx_low[ix] == 0 and wx_high[ix] == 0:
                            continue
                        w_ll, w_lh = wy_low[iy] * wx_low[ix], wy_low[iy] * wx_high[ix]
                        w_hl, w_hh = wy_high[iy] * wx_low[ix], wy_high[iy] * wx_high[ix]
                        i_ll = _unsigned((row_low + x_low[ix]) * channels + c0)
                        i_lh = _unsigned((row_low + x_high[ix]) * channels + c0)
                        i_hl = _unsigned((row_high + x_low[ix]) * channels + c0)
                        i_hh = _unsigned((row_high + x_high[ix]) * channels + c0)
                        for c in range(_unsigned(block)):
                            acc[c] += (
                                w_ll * flat[i_ll + c] + w_lh * flat[i_lh + c]
                                + w_hl * flat[i_hl + c] + w_hh * flat[i_hh + c]
                            )
        # [ph*pw, block] -> output[k, c0:c0+block] ([block, ph, pw]), through flat unsigned indices
        num_bins = _unsigned(pooled_h * pooled_w)
        bins_flat, out_flat = bins.reshape(-1), output.reshape(-1)
        first = _unsigned(k * channels + c0) * num_bins
        inv_count = np.ones(1, output.dtype)[0] / count  # a multiply per cell, not a divide
        for c in range(_unsigned(block)):
            for j in range(num_bins):
                out_flat[first + c * num_bins + j] = bins_flat[j * _unsigned(block) + c] * inv_count


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _backward_cpu(
    grad_output, rois, rois_by_image, image_offsets, spatial_scale, sampling_ratio, aligned, block, grad_nhwc
):
    """grad_output: [K, C, ph, pw] contiguous; grad_nhwc: [N, H, W, C] zeros (accumulated into).

    Race-free: a task owns one (image, channel block) slice of grad_nhwc and
    visits that image's RoIs one after the other (rois_by_image[image_offsets[n]:
    image_offsets[n + 1]]), so no two threads ever add to the same cell, and
    the result does not depend on the thread count.
    """
    num_images, height, width, channels = grad_nhwc.shape
    pooled_h, pooled_w = grad_output.shape[2], grad_output.shape[3]
    flat, grad_flat = grad_nhwc.reshape(-1), grad_output.reshape(-1)
    num_bins = _unsigned(pooled_h * pooled_w)
    num_blocks = (channels + block - 1) // block
    for task in numba.prange(num_images * num_blocks):
        n, c0 = task // num_blocks, (task % num_blocks) * block
        width_c = min(c0 + block, channels) - c0
        grad_bins = np.empty((pooled_h * pooled_w, width_c), grad_nhwc.dtype)
        grad_bins_flat = grad_bins.reshape(-1)
        for r in range(image_offsets[n], image_offsets[n + 1]):
            k = rois_by_image[r]
            start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = _roi_geometry_cpu(
                rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], pooled_h, pooled_w, spatial_scale, sampling_ratio,
                aligned,
            )
            y_low, y_high, wy_low, wy_high = _axis_tables(start_y, bin_h, grid_h, pooled_h, height, grad_nhwc)
            x_low, x_high, wx_low, wx_high = _axis_tables(start_x, bin_w, grid_w, pooled_w, width, grad_nhwc)
            # gather this RoI's gradient channels-last, divided by count, through flat unsigned indices
            first = _unsigned(k * channels + c0) * num_bins
            inv_count = np.ones(1, grad_nhwc.dtype)[0] / count
            for c in range(_unsigned(width_c)):
                for j in range(num_bins):
                    grad_bins_flat[j * _unsigned(width_c) + c] = grad_flat[first + c * num_bins + j] * inv_count
            for py in range(pooled_h):
                for px in range(pooled_w):
                    grad = grad_bins[py * pooled_w + px]
                    for iy in range(py * grid_h, (py + 1) * grid_h):
                        if wy_low[iy] == 0 and wy_high[iy] == 0:
                            continue  # outside the map: no gradient (and no chain of += 0 on pixel 0)
                        row_low = (n * height + y_low[iy]) * width
                        row_high = (n * height + y_high[iy]) * width
                        for ix in range(px * grid_w, (px + 1) * grid_w):
                            if wx_low[ix] == 0 and wx_high[ix] == 0:
                                continue
                            w_ll, w_lh = wy_low[iy] * wx_low[ix], wy_low[iy] * wx_high[ix]
                            w_hl, w_hh = wy_high[iy] * wx_low[ix], wy_high[iy] * wx_high[ix]
                            i_ll = _unsigned((row_low + x_low[ix]) * channels + c0)
                            i_lh = _unsigned((row_low + x_high[ix]) * channels + c0)
                            i_hl = _unsigned((row_high + x_low[ix]) * channels + c0)
                            i_hh = _unsigned((row_high + x_high[ix]) * channels + c0)
                            for c in range(_unsigned(width_c)):
                                flat[i_ll + c] += w_ll * grad[c]
                                flat[i_lh + c] += w_lh * grad[c]
                                flat[i_hl + c] += w_hl * grad[c]
                                flat[i_hh + c] += w_hh * grad[c]


def _numba_forward(features, rois, params):
    (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned = params
    num_rois, channels = rois.shape[0], features.shape[1]
    output = torch.empty((num_rois, channels, pooled_h, pooled_w), dtype=features.dtype)
    if num_rois == 0 or channels == 0:
        return output
    features_nhwc = features.detach().permute(0, 2, 3, 1)
    if not features_nhwc.is_contiguous():  # free when features are already channels_last
        features_nhwc = features_nhwc.contiguous()
    rois64 = rois.detach().numpy().astype(np.float64)
    rois_by_image, _ = image_order(rois64, features.shape[0])
    _forward_cpu(
        features_nhwc.numpy(), rois64, rois_by_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
        output.numpy(),
    )
    return output


def _numba_backward(grad_output, rois, feature_shape, params):
    _, spatial_scale, sampling_ratio, aligned = params
    num_images, channels, height, width = feature_shape
    # Returned as a channels_last tensor: the right shape, and autograd accepts any strides.
    grad_nhwc = torch.zeros((num_images, height, width, channels), dtype=grad_output.dtype)
    if rois.shape[0] > 0 and channels > 0:
        rois64 = rois.detach().numpy().astype(np.float64)
        rois_by_image, image_offsets = image_order(rois64, num_images)
        threads = numba.get_num_threads()
        # enough (image, block) tasks to keep every thread busy, blocks of 8..64 channels
        block = min(BACKWARD_MAX_BLOCK, max(8, -(-channels * num_images // (2 * threads))))
        grad = grad_output.detach().contiguous().numpy()
        _backward_cpu(
            grad, rois64, rois_by_image, image_offsets, spatial_scale, sampling_ratio, aligned, block,
            grad_nhwc.numpy(),
        )
    return grad_nhwc.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------
# 4. CUDA kernels (numba.cuda): one thread per output cell; the backward adds
#    with atomics, as several RoIs may read the same pixel. Under
#    NUMBA_ENABLE_CUDASIM=1 the same kernels run, slowly, on CPU arrays.
#
#    One kernel serves one map and several (the FPN levels of a pooler, or the
#    mask images of a batch): the maps travel as one flat buffer, level l's
#    [N_l, C, H_l, W_l] block at offset level_table[l, 0], and each RoI carries
#    its level index. A pooler then launches once for all levels.
#
#    The kernels exist once per float type and do all their arithmetic in it:
#    numba types a Python float literal (0.0, 0.5) and an int-float product as
#    float64, which would make a float32 kernel compute in float64 (half rate or
#    worse on a GPU). Every operand is cast to `real` explicitly, as torchvision's
#    kernel computes in its type T.
# ---------------------------------------------------------------------------


def _cuda_helpers_in(real):
    """roi_geometry and linear_interpolation_1d with every operand and constant in `real`."""

    def geometry(roi_x1, roi_y1, roi_x2, roi_y2, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
        offset = real(0.5) if aligned else real(0.0)
        start_x = roi_x1 * spatial_scale - offset
        start_y = roi_y1 * spatial_scale - offset
        roi_w = roi_x2 * spatial_scale - offset - start_x
        roi_h = roi_y2 * spatial_scale - offset - start_y
        if not aligned:  # (conditional expressions: numba's CUDA target rejects max(a, b))
            roi_w = roi_w if roi_w > real(1.0) else real(1.0)
            roi_h = roi_h if roi_h > real(1.0) else real(1.0)
        bin_h = roi_h / real(pooled_h)
        bin_w = roi_w / real(pooled_w)
        grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_w))
        count = grid_h * grid_w if grid_h * grid_w > 1 else 1
        return start_y, start_x, bin_h, bin_w, grid_h, grid_w, count

    def interpolation(coord, size):
        if not (coord >= real(-1.0) and coord <= real(size)):  # negated so that NaN lands here
            return 0, 0, real(0.0), real(0.0)
        if coord < real(0.0):
            coord = real(0.0)
        low = int(coord)
        if low >= size - 1:
            return size - 1, size - 1, real(1.0), real(0.0)
        frac = coord - real(low)
        return low, low + 1, real(1.0) - frac, frac

    def sample(start, p, bin_size, i, grid):
        """Coordinate of sample i of bin p along one axis (torchvision's order of operations)."""
        return start + real(p) * bin_size + (real(i) + real(0.5)) * bin_size / real(grid)

    return geometry, interpolation, sample


def cuda_device_functions_in(real):
    """(cell_setup, interpolation, sample): CUDA device functions in float type `real` for
    kernels with one thread per output cell over flat level maps (RoIAlign's; RoIWarp's max
    kernels use them too). cell_setup is the per-cell set-up that every such kernel starts with."""
    geometry, interpolation, sample = (cuda.jit(device=True)(f) for f in _cuda_helpers_in(real))

    @cuda.jit(device=True)
    def cell_setup(index, cells_shape, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned):
        """Output cell `index` of [K, C, ph, pw] (`cells_shape`) -> its (k, c, py, px), its map's
        height and width, the flat offset of its (image, channel) plane in the maps, and its RoI's
        geometry (start_y, start_x, bin_h, bin_w, grid_h, grid_w, count)."""
        _, channels, pooled_h, pooled_w = cells_shape
        k, c, py, px = unravel_cell(index, channels, pooled_h, pooled_w)
        level = roi_levels[k]
        height, width = level_table[level, 1], level_table[level, 2]
        plane = level_table[level, 0] + (int(rois[k, 0]) * channels + c) * height * width
        start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = geometry(
            rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], pooled_h, pooled_w, level_scales[level],
            sampling_ratio, aligned,
        )
        return k, c, py, px, height, width, plane, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count

    return cell_setup, interpolation, sample


def _cuda_kernels_in(real):
    """The (forward, backward) Python functions of the CUDA kernels in float type `real`."""
    cell_setup, interpolation, sample = cuda_device_functions_in(real)

    def forward(features, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned, output):
        """features: [T] flat maps; level_table: [L, 3] int64; level_scales: [L]; rois: [K, 5];
        roi_levels: [K] int64 in [0, L); output: [K, C, ph, pw] (written)."""
        num_rois, channels, pooled_h, pooled_w = output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px, height, width, plane, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = cell_setup(
                index, output.shape, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned)
            total = real(0.0)
            for iy in range(grid_h):
                y_low, y_high, wy_low, wy_high = interpolation(sample(start_y, py, bin_h, iy, grid_h), height)
                if wy_low == real(0.0) and wy_high == real(0.0):
                    continue  # samples outside the map add nothing (and 0 * inf would be NaN)
                row_low, row_high = plane + y_low * width, plane + y_high * width
                for ix in range(grid_w):
                    x_low, x_high, wx_low, wx_high = interpolation(sample(start_x, px, bin_w, ix, grid_w), width)
                    if wx_low == real(0.0) and wx_high == real(0.0):
                        continue
                    total += (
                        wy_low * (wx_low * features[row_low + x_low] + wx_high * features[row_low + x_high])
                        + wy_high * (wx_low * features[row_high + x_low] + wx_high * features[row_high + x_high])
                    )
            output[k, c, py, px] = total / real(count)

    def backward(grad_output, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned, grad_features):
        """grad_output: [K, C, ph, pw]; grad_features: [T] flat zeros (atomically accumulated into)."""
        num_rois, channels, pooled_h, pooled_w = grad_output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px, height, width, plane, start_y, start_x, bin_h, bin_w, grid_h, grid_w, count = cell_setup(
                index, grad_output.shape, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned)
            grad = grad_output[k, c, py, px] / real(count)
            for iy in range(grid_h):
                y_low, y_high, wy_low, wy_high = interpolation(sample(start_y, py, bin_h, iy, grid_h), height)
                if wy_low == real(0.0) and wy_high == real(0.0):
                    continue  # samples outside the map: no gradient (and no atomics on pixel 0)
                row_low, row_high = plane + y_low * width, plane + y_high * width
                for ix in range(grid_w):
                    x_low, x_high, wx_low, wx_high = interpolation(sample(start_x, px, bin_w, ix, grid_w), width)
                    if wx_low == real(0.0) and wx_high == real(0.0):
                        continue
                    cuda.atomic.add(grad_features, row_low + x_low, grad * wy_low * wx_low)
                    cuda.atomic.add(grad_features, row_low + x_high, grad * wy_low * wx_high)
                    cuda.atomic.add(grad_features, row_high + x_low, grad * wy_high * wx_low)
                    cuda.atomic.add(grad_features, row_high + x_high, grad * wy_high * wx_high)

    return forward, backward


def _cuda_signature(real):
    """void(cells [T] or [K, C, ph, pw], level_table, level_scales, rois, roi_levels, sampling_ratio,
    aligned, out): the forward's; the backward swaps the first and last array types."""
    flat, table, rois = c_array(real, 1), c_array(np.int64, 2), c_array(real, 2)
    cells, levels = c_array(real, 4), c_array(np.int64, 1)
    tail = (table, flat, rois, levels, numba.types.int64, numba.types.boolean)
    return numba.types.void(flat, *tail, cells), numba.types.void(cells, *tail, flat)


CUDA_KERNELS = lazy_kernels_per_float_type(_cuda_kernels_in, _cuda_signature)  # torch dtype -> (forward, backward) LazyKernels
def _cuda_forward_levels(features, rois, roi_levels, params):
    """features: L maps; rois: [K, 5]; roi_levels: [K] int64 -> [K, C, ph, pw] in the compute dtype."""
    (pooled_h, pooled_w), spatial_scales, sampling_ratio, aligned = params
    dtype, device = CUDA_COMPUTE_DTYPES[features[0].dtype], features[0].device
    output = torch.empty((rois.shape[0], features[0].shape[1], pooled_h, pooled_w), dtype=dtype, device=device)
    if output.numel() > 0:
        table, _ = level_table([f.shape for f in features], device)
        inputs = (flat_maps([f.detach() for f in features], dtype), table,
                  level_scales(spatial_scales, dtype, device), rois.detach().to(dtype), roi_levels)
        cuda_launch(CUDA_KERNELS[dtype][0], output.numel(), inputs, (sampling_ratio, aligned), (output,), device)
    return output


def _cuda_backward_levels(grad_output, rois, roi_levels, feature_shapes, params):
    """-> one gradient per level map, [N_l, C, H_l, W_l] views of one flat buffer (compute dtype)."""
    _, spatial_scales, sampling_ratio, aligned = params
    dtype, device = grad_output.dtype, grad_output.device
    table, total = level_table(feature_shapes, device)
    grad_flat = torch.zeros(total, dtype=dtype, device=device)
    if grad_output.numel() > 0:
        inputs = (grad_output.detach(), table, level_scales(spatial_scales, dtype, device), rois.detach().to(dtype),
                  roi_levels)
        cuda_launch(CUDA_KERNELS[dtype][1], grad_output.numel(), inputs, (sampling_ratio, aligned), (grad_flat,),
                    device)
    return split_flat(grad_flat, feature_shapes)


def _cuda_forward(features, rois, params):
    output_size, spatial_scale, sampling_ratio, aligned = params
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return _cuda_forward_levels([features], rois, roi_levels, (output_size, (spatial_scale,), sampling_ratio, aligned))


def _cuda_backward(grad_output, rois, feature_shape, params):
    output_size, spatial_scale, sampling_ratio, aligned = params
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    (grad,) = _cuda_backward_levels(grad_output, rois, roi_levels, [feature_shape],
                                    (output_size, (spatial_scale,), sampling_ratio, aligned))
    return grad


# ---------------------------------------------------------------------------
# 5. Dispatch: backend name -> (forward, backward), where
#    forward(features, rois, params) -> output and
#    backward(grad_output, rois, feature_shape, params) -> grad_features,
#    with params = (output_size, spatial_scale, sampling_ratio, aligned).
# ---------------------------------------------------------------------------


def _reference_forward(features, rois, params):
    output = roi_align_reference(features.detach().numpy(), rois.detach().numpy(), *params)
    return torch.from_numpy(output).to(features.dtype)


def _reference_backward(grad_output, rois, feature_shape, params):
    grad = roi_align_backward_reference(grad_output.detach().numpy(), rois.detach().numpy(), feature_shape, *params)
    return torch.from_numpy(grad).to(grad_output.dtype)


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "numba": (_numba_forward, _numba_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}


# ---------------------------------------------------------------------------
# 6. Autograd function and public API.
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
    if backend == "cuda":
        check_cuda_backend(features.device)
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


# ---------------------------------------------------------------------------
# 6b. Several maps at once: each RoI pooled from its own map (an FPN pooler's
#     levels, a batch's mask images). On CUDA one kernel launch for all maps;
#     on CPU one call of the single-map kernels per map, exactly as
#     roi_align(features[l], rois[roi_levels == l], ...) would compute it.
# ---------------------------------------------------------------------------


def _per_map_forward(forward_fn):
    """A multi-map forward from a single-map one: one call per map on that map's RoIs (CPU)."""

    def forward(features, rois, roi_levels, params):
        output_size, spatial_scales, sampling_ratio, aligned = params
        output = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
        for level, (level_features, spatial_scale) in enumerate(zip(features, spatial_scales)):
            rows = torch.nonzero(roi_levels == level).flatten()
            if rows.numel() > 0:
                output[rows] = forward_fn(level_features, rois[rows], (output_size, spatial_scale, sampling_ratio,
                                                                       aligned))
        return output

    return forward


def _per_map_backward(backward_fn):
    def backward(grad_output, rois, roi_levels, feature_shapes, params):
        output_size, spatial_scales, sampling_ratio, aligned = params
        grads = []
        for level, (shape, spatial_scale) in enumerate(zip(feature_shapes, spatial_scales)):
            rows = torch.nonzero(roi_levels == level).flatten()
            if rows.numel() == 0:
                grads.append(grad_output.new_zeros(shape))
                continue
            grads.append(backward_fn(grad_output[rows], rois[rows], shape,
                                     (output_size, spatial_scale, sampling_ratio, aligned)))
        return grads

    return backward


_LEVEL_BACKENDS = {
    "reference": (_per_map_forward(_reference_forward), _per_map_backward(_reference_backward)),
    "numba": (_per_map_forward(_numba_forward), _per_map_backward(_numba_backward)),
    "cuda": (_cuda_forward_levels, _cuda_backward_levels),
}


class _RoIAlignLevelsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rois, roi_levels, params, backend, *features):
        ctx.save_for_backward(rois, roi_levels)
        ctx.params, ctx.backend = params, backend
        ctx.feature_shapes = [tuple(f.shape) for f in features]
        ctx.feature_dtypes = [f.dtype for f in features]
        forward_fn, _ = _LEVEL_BACKENDS[backend]
        return forward_fn(list(features), rois, roi_levels, params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, roi_levels = ctx.saved_tensors
        _, backward_fn = _LEVEL_BACKENDS[ctx.backend]
        grads = backward_fn(grad_output.contiguous(), rois, roi_levels, ctx.feature_shapes, ctx.params)
        # (a map read in bf16 gets its gradient back in bf16, as a cast of the map would give it)
        return (None, None, None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.feature_dtypes)))


def roi_align_levels(features, rois, roi_levels, output_size, spatial_scales, sampling_ratio=-1, aligned=True,
                     backend="auto"):
    """RoIAlign of each RoI on its own map: RoI k is pooled from features[roi_levels[k]] at
    spatial_scales[roi_levels[k]]. On CUDA one kernel launch for all maps (a pooler's FPN levels).

    features: L tensors [N_l, C, H_l, W_l] (same C, dtype and device; on CUDA also bf16/fp16,
        read into float32 as the maps are gathered, so no separate cast of the maps)
    rois: [K, 5] (batch_index into its own map, x1, y1, x2, y2); roi_levels: [K] int64 in [0, L)
    spatial_scales: L numbers; output_size, sampling_ratio, aligned, backend: as roi_align's
    Returns: [K, C, ph, pw] in float32/float64 (the maps' type; float32 for bf16/fp16 maps),
    row k equal to roi_align(features[l], rois[k:k+1], output_size, spatial_scales[l], ...).
    """
    pooled = output_size_pair(output_size)
    spatial_scales = tuple(check_spatial_scale(scale) for scale in spatial_scales)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    compute = check_maps(features, rois, roi_levels, spatial_scales, backend)
    backend = resolve_backend(backend, features[0])
    if backend == "cuda":
        check_cuda_backend(features[0].device)
    params = (pooled, spatial_scales, int(sampling_ratio), bool(aligned))
    return _RoIAlignLevelsFunction.apply(rois.detach().to(compute), roi_levels, params, backend, *features)


# ---------------------------------------------------------------------------
# 7. Random RoIs with the edge cases, for the tests and benchmarks that check
#    every backend against the reference (tests/, bench/).
# ---------------------------------------------------------------------------


def random_rois(generator, num_rois, num_images, height, width, spatial_scale=1.0, dtype=torch.float64):
    """[num_rois, 5] RoIs in image coordinates over a map of height x width, with the edge cases:

    ordinary boxes, boxes partly and wholly outside the map, boxes under a pixel,
    boxes several times the map, and zero-width / zero-height boxes.
    """
    image_h, image_w = height / spatial_scale, width / spatial_scale
    corner = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    size = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 0.8
    kind = torch.arange(num_rois) % 6
    size[kind == 1] *= 0.02  # under a pixel (on the map)
    size[kind == 2] += 2.0  # several times the map
    corner[kind == 3] += 1.5  # wholly outside
    size[kind == 4, 0] = 0.0  # zero width
    size[kind == 5, 1] = 0.0  # zero height
    boxes = torch.cat([corner, corner + size], dim=1) * torch.tensor([image_w, image_h, image_w, image_h])
    batch_index = torch.randint(num_images, (num_rois, 1), generator=generator).double()
    return torch.cat([batch_index, boxes], dim=1).to(dtype)
