"""RoIWarp and max-RoIAlign: the middle rows of Mask R-CNN's Table 2c, as one op.

Table 2c separates the two things RoIAlign changes with respect to RoIPool:
    quantization: RoIPool rounds the RoI's corners to the feature grid (and its bins);
    reduction:    RoIPool takes the max over a bin, RoIAlign the average of bilinear samples.
RoIWarp (Dai et al., MNC 2016) quantizes the corners as RoIPool does but samples
bilinearly as RoIAlign does. ``roi_warp(..., quantize, reduction)`` covers all four
combinations of bilinear sampling:

    quantize=True,  reduction="avg"  RoIWarp (ave)     quantize=False, reduction="avg"  RoIAlign (= roi_align)
    quantize=True,  reduction="max"  RoIWarp max       quantize=False, reduction="max"  RoIAlign max

Shape shorthand:
    N: images, C: channels, H, W: feature map size
    K: RoIs, ph, pw: output (pooled) size, gh, gw: samples per bin along y, x

Semantics (RoIAlign's, REFERENCE.md, with two switches):
    quantize: each corner becomes round(x * spatial_scale) with C rounding (halves away
        from zero), exactly as RoIPool rounds it, and the quantized corners are used on
        the feature map (scale 1). Nothing else is rounded: the bins and samples are
        RoIAlign's. With ``aligned`` (the model's setting) the half-pixel shift comes
        after the rounding, so a quantized corner sits on a pixel boundary, which is
        where RoIPool's rounding puts it too.
    samples: start = corner - 0.5 if aligned else corner; roi size clamped to >= 1 only
        when not aligned; bin = size / pooled; samples per bin = sampling_ratio, or
        ceil(size / pooled) if <= 0; sample (iy, ix) of bin (py, px) at
        start + p * bin + (i + 0.5) * bin / grid; a sample outside [-1, H] x [-1, W] has
        the value 0 (the map is not read); inside, it is clamped and interpolated bilinearly.
    reduction "avg": sum of the bin's samples / max(gh * gw, 1) (RoIAlign).
    reduction "max": the largest sample value of the bin, outside samples counting as 0;
        strict '>' in (iy, ix) row-major order, so the first sample wins ties; a bin with
        no samples (an empty RoI when aligned) is 0. The gradient goes to the four pixels
        of the winning sample, with its bilinear weights (none for an outside sample).

Since only the corners are rounded, RoIWarp (ave) *is* RoIAlign on the rounded corners
at spatial_scale 1; the "numba" and "cuda" backends run it that way, on roi_align's
fast kernels (``quantized_rois`` below). The kernels of this file serve the max
reduction. The CPU kernels' helpers repeat RoIAlign's geometry, with the quantization
in it, to be read beside the reference; the CUDA kernels are RoIAlign's with a max for
the mean, on roi_align.py's device functions and flat level layout (one launch serves
all of a pooler's levels: roi_warp_levels), with the corners rounded before the launch.
The NumPy reference covers all four combinations, and tests/test_roi_warp.py pins every
backend to it.

The file reads top to bottom: 1. NumPy reference (the spec) -> 2. scalar helpers of the
CPU kernels -> 3. Numba CPU kernels -> 4. numba.cuda kernels -> 5. dispatch
-> 6. autograd function, public function and nn.Module -> 6b. several maps at once.
"""

import math

import numba
import numpy as np
import torch
from numba import cuda
from torch import nn
from torch.autograd.function import once_differentiable

from minimrcnn.ops._numba import (  # first: Numba set-up
    c_array, cuda_launch, image_order, lazy_kernels_per_float_type,
)
from minimrcnn.ops._maps import CUDA_COMPUTE_DTYPES, check_maps, flat_maps, level_scales, level_table, split_flat
from minimrcnn.ops.roi_align import _unsigned, cuda_device_functions_in, roi_align, roi_align_levels
from minimrcnn.ops._validate import (
    check_cuda_backend,
    check_features_and_rois,
    check_spatial_scale,
    output_size_pair,
    resolve_backend,
)

REDUCTIONS = ("avg", "max")
NO_SAMPLE = -1  # argmax of a bin without samples

# ---------------------------------------------------------------------------
# 1. NumPy reference: loops that follow the semantics above line by line.
# ---------------------------------------------------------------------------


def c_round(value):
    """C's round(): halves go away from zero (2.5 -> 3, -2.5 -> -3), as RoIPool rounds corners."""
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


def _reference_taps(y, x, height, width):
    """The (row, col, weight) of the up to four pixels a sample at (y, x) reads; [] outside."""
    if not (-1.0 <= y <= height and -1.0 <= x <= width):  # negated so that NaN lands here
        return []
    y, x = max(y, 0.0), max(x, 0.0)
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
    return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def _reference_bins(roi, height, width, output_size, spatial_scale, sampling_ratio, aligned, quantize):
    """Yield (py, px, samples) per bin of one RoI, samples = a list (in iy, ix order) of tap lists."""
    pooled_h, pooled_w = output_size
    corners = [roi[1] * spatial_scale, roi[2] * spatial_scale, roi[3] * spatial_scale, roi[4] * spatial_scale]
    if quantize:
        corners = [float(c_round(corner)) for corner in corners]
    offset = 0.5 if aligned else 0.0
    start_x, start_y = corners[0] - offset, corners[1] - offset
    roi_w, roi_h = corners[2] - offset - start_x, corners[3] - offset - start_y
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / pooled_w, roi_h / pooled_h
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled_h)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled_w)
    for py in range(pooled_h):
        for px in range(pooled_w):
            samples = []
            for iy in range(grid_h):
                y = start_y + py * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_x + px * bin_w + (ix + 0.5) * bin_w / grid_w
                    samples.append(_reference_taps(y, x, height, width))
            yield py, px, samples


def roi_warp_reference(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
                       quantize=True, reduction="avg"):
    """features: [N, C, H, W] array, rois: [K, 5] array -> [K, C, ph, pw] float64 array."""
    return _reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize, reduction)[0]


def roi_warp_backward_reference(features, grad_output, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
                                aligned=True, quantize=True, reduction="avg"):
    """Gradient w.r.t. features [N, C, H, W] (float64) of sum(grad_output * roi_warp(features)).

    The max reduction needs the features to know which sample won, hence the argument.
    """
    return _reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize, reduction,
                      grad_output)[1]


def _reference(features, rois, output_size, spatial_scale, sampling_ratio, aligned, quantize, reduction,
               grad_output=None):
    """(output [K, C, ph, pw], grad_features [N, C, H, W]); the gradient is zeros without grad_output."""
    features = np.asarray(features, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    pooled_h, pooled_w = output_size
    _, channels, height, width = features.shape
    output = np.zeros((len(rois), channels, pooled_h, pooled_w))
    grad_features = np.zeros(features.shape)
    for k, roi in enumerate(rois):
        b = int(roi[0])
        bins = _reference_bins(roi, height, width, output_size, spatial_scale, sampling_ratio, aligned, quantize)
        for py, px, samples in bins:
            for c in range(channels):
                values = [sum(w * features[b, c, r, col] for r, col, w in taps) for taps in samples]  # [] -> 0
                if reduction == "avg":  # every sample, weight 1 / count
                    chosen = [(taps, 1.0 / max(len(samples), 1)) for taps in samples]
                else:  # the first sample of the largest value, weight 1
                    chosen = [(samples[values.index(max(values))], 1.0)] if samples else []
                for taps, scale in chosen:
                    for r, col, w in taps:
                        output[k, c, py, px] += scale * w * features[b, c, r, col]
                        if grad_output is not None:
                            grad_features[b, c, r, col] += scale * w * grad_output[k, c, py, px]
    return output, grad_features


# ---------------------------------------------------------------------------
# 2. Scalar helpers of the CPU kernels (plain Python, compiled with numba.njit).
#    No max()/min() builtins: numba's CUDA target rejects them, and these
#    helpers state the same rules as the CUDA kernels' (section 4).
# ---------------------------------------------------------------------------


def warp_geometry(x1, y1, x2, y2, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, quantize):
    """-> (start_y, start_x, bin_h, bin_w, grid_h, grid_w, count) of one RoI on the feature map."""
    x1, y1, x2, y2 = x1 * spatial_scale, y1 * spatial_scale, x2 * spatial_scale, y2 * spatial_scale
    if quantize:  # C rounding, as RoIPool: floor(v + 0.5) for v >= 0, -floor(-v + 0.5) below
        x1 = math.floor(x1 + 0.5) if x1 >= 0 else -math.floor(-x1 + 0.5)
        y1 = math.floor(y1 + 0.5) if y1 >= 0 else -math.floor(-y1 + 0.5)
        x2 = math.floor(x2 + 0.5) if x2 >= 0 else -math.floor(-x2 + 0.5)
        y2 = math.floor(y2 + 0.5) if y2 >= 0 else -math.floor(-y2 + 0.5)
    offset = 0.5 if aligned else 0.0
    start_x = x1 - offset
    start_y = y1 - offset
    roi_w = x2 - offset - start_x
    roi_h = y2 - offset - start_y
    if not aligned:
        roi_w = roi_w if roi_w > 1.0 else 1.0
        roi_h = roi_h if roi_h > 1.0 else 1.0
    grid_h = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_h / pooled_h))
    grid_w = sampling_ratio if sampling_ratio > 0 else int(math.ceil(roi_w / pooled_w))
    count = grid_h * grid_w if grid_h * grid_w > 1 else 1
    return start_y, start_x, roi_h / pooled_h, roi_w / pooled_w, grid_h, grid_w, count


def axis_taps(coord, size):
    """One axis of a bilinear sample: (low, high, w_low, w_high); both weights 0 outside [-1, size]."""
    if not (coord >= -1.0 and coord <= size):  # negated so that NaN lands here
        return 0, 0, 0.0, 0.0
    if coord < 0.0:
        coord = 0.0
    low = int(coord)
    if low >= size - 1:
        return size - 1, size - 1, 1.0, 0.0
    frac = coord - low
    return low, low + 1, 1.0 - frac, frac


_geometry_cpu = numba.njit(cache=True)(warp_geometry)
_axis_cpu = numba.njit(cache=True)(axis_taps)

# ---------------------------------------------------------------------------
# 3. Numba CPU kernels of the max reduction (the average runs on roi_align's
#    kernels, see roi_warp). The forward reads the map channels-last, [N, H, W, C],
#    as roi_align's does: a sample's four taps are then four contiguous runs of
#    channels, and the innermost loop (over channels) compares a whole run against
#    the running maxima; one task per (channel block, RoI). The backward runs one
#    task per (image, channel chunk) on [N, C, H, W], which writes only its own
#    planes of the gradient: no two threads ever add to the same pixel.
# ---------------------------------------------------------------------------

CHANNEL_BLOCK = 64  # channels per forward task


@numba.njit(cache=True)
def _sample_axis(start, bin_size, grid, pooled, size):
    """Taps of every sample along one axis, indexed p * grid + i: low, high, w_low, w_high."""
    num = pooled * grid if pooled * grid > 0 else 0
    low = np.empty(num, np.int64)
    high = np.empty(num, np.int64)
    w_low = np.empty(num, np.float64)
    w_high = np.empty(num, np.float64)
    for p in range(pooled):
        for i in range(grid):
            j = p * grid + i
            low[j], high[j], w_low[j], w_high[j] = _axis_cpu(start + p * bin_size + (i + 0.5) * bin_size / grid, size)
    return low, high, w_low, w_high


@numba.njit(cache=True)
def _roi_tables(roi, pooled_h, pooled_w, height, width, spatial_scale, sampling_ratio, aligned, quantize):
    start_y, start_x, bin_h, bin_w, grid_h, grid_w, _ = _geometry_cpu(
        roi[1], roi[2], roi[3], roi[4], pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, quantize
    )
    ys = _sample_axis(start_y, bin_h, grid_h, pooled_h, height)
    xs = _sample_axis(start_x, bin_w, grid_w, pooled_w, width)
    return ys, xs, grid_h, grid_w


@numba.njit(parallel=True, cache=True)
def _forward_cpu(features_nhwc, rois, rois_by_image, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                 quantize, output, argmax):
    """features_nhwc: [N, H, W, C] contiguous; rois: [K, 5] float64; output [K, C, ph, pw] (each
    bin's largest sample, computed in float64 as the reference) and argmax [K, C, ph, pw] int32
    (that sample's index iy * gw + ix in its bin) written. Samples are visited in the reference's
    order and a later one wins only if strictly larger, so ties and NaNs resolve as there."""
    num_rois = rois.shape[0]
    height, width, channels = features_nhwc.shape[1], features_nhwc.shape[2], features_nhwc.shape[3]
    flat = features_nhwc.reshape(-1)
    num_blocks = (channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    for task in numba.prange(num_rois * num_blocks):  # task = (channel block, RoI), RoIs by image
        k, c0 = rois_by_image[task % num_rois], (task // num_rois) * CHANNEL_BLOCK
        block = min(c0 + CHANNEL_BLOCK, channels) - c0
        b = int(rois[k, 0])
        (y_low, y_high, wy_low, wy_high), (x_low, x_high, wx_low, wx_high), grid_h, grid_w = _roi_tables(
            rois[k], pooled_h, pooled_w, height, width, spatial_scale, sampling_ratio, aligned, quantize
        )
        best, best_at = np.zeros(block, np.float64), np.full(block, NO_SAMPLE, np.int32)
        for py in range(pooled_h):
            for px in range(pooled_w):
                best_index = NO_SAMPLE  # the first sample of a bin always wins: no per-channel flag
                for iy in range(py * grid_h, (py + 1) * grid_h):
                    y_inside = wy_low[iy] != 0 or wy_high[iy] != 0
                    row_low, row_high = (b * height + y_low[iy]) * width, (b * height + y_high[iy]) * width
                    for ix in range(px * grid_w, (px + 1) * grid_w):
                        index = (iy - py * grid_h) * grid_w + (ix - px * grid_w)
                        inside = y_inside and (wx_low[ix] != 0 or wx_high[ix] != 0)
                        a_low, a_high, b_low, b_high = wy_low[iy], wy_high[iy], wx_low[ix], wx_high[ix]
                        i_ll = _unsigned((row_low + x_low[ix]) * channels + c0)
                        i_lh = _unsigned((row_low + x_high[ix]) * channels + c0)
                        i_hl = _unsigned((row_high + x_low[ix]) * channels + c0)
                        i_hh = _unsigned((row_high + x_high[ix]) * channels + c0)
                        if not inside:  # an outside sample is 0 and does not read the map (0 * inf = NaN)
                            for c in range(_unsigned(block)):
                                larger = best_index == NO_SAMPLE or 0.0 > best[c]
                                best[c] = 0.0 if larger else best[c]
                                best_at[c] = index if larger else best_at[c]
                        elif best_index == NO_SAMPLE:  # the bin's first sample
                            for c in range(_unsigned(block)):
                                best[c] = (a_low * (b_low * flat[i_ll + c] + b_high * flat[i_lh + c])
                                           + a_high * (b_low * flat[i_hl + c] + b_high * flat[i_hh + c]))
                                best_at[c] = index
                        else:  # a later sample wins only if strictly larger (selects: no branch per channel)
                            for c in range(_unsigned(block)):
                                value = (a_low * (b_low * flat[i_ll + c] + b_high * flat[i_lh + c])
                                         + a_high * (b_low * flat[i_hl + c] + b_high * flat[i_hh + c]))
                                larger = value > best[c]
                                best[c] = value if larger else best[c]
                                best_at[c] = index if larger else best_at[c]
                        best_index = index
                if best_index == NO_SAMPLE:  # a bin without samples: 0, argmax NO_SAMPLE
                    best[:] = 0.0
                    best_at[:] = NO_SAMPLE
                for c in range(block):
                    output[k, c0 + c, py, px] = best[c]
                    argmax[k, c0 + c, py, px] = best_at[c]


@numba.njit(parallel=True, cache=True)
def _backward_cpu(grad_output, argmax, rois, rois_by_image, image_offsets, spatial_scale, sampling_ratio, aligned,
                  quantize, channel_chunk, grad_features):
    """grad_output, argmax: [K, C, ph, pw]; grad_features: [N, C, H, W] zeros, written chunk by chunk.

    Task (image b, channels c0..c1) runs over the RoIs of image b, builds each RoI's tables once
    and adds each cell's gradient to the four pixels of its winning sample, in
    grad_features[b, c0:c1] only: no two tasks write the same pixel.
    """
    num_images, channels, height, width = grad_features.shape
    pooled_h, pooled_w = grad_output.shape[2], grad_output.shape[3]
    # flat views with unsigned indices (see _unsigned); the same adds in the same order as 4-D indexing
    grad_flat, grads, winners = grad_features.reshape(-1), grad_output.reshape(-1), argmax.reshape(-1)
    num_bins, plane_size = pooled_h * pooled_w, height * width
    num_chunks = (channels + channel_chunk - 1) // channel_chunk
    for task in numba.prange(num_images * num_chunks):
        b, c0 = task // num_chunks, (task % num_chunks) * channel_chunk
        c1 = c0 + channel_chunk if c0 + channel_chunk < channels else channels
        for j in range(image_offsets[b], image_offsets[b + 1]):
            k = rois_by_image[j]
            (y_low, y_high, wy_low, wy_high), (x_low, x_high, wx_low, wx_high), grid_h, grid_w = _roi_tables(
                rois[k], pooled_h, pooled_w, height, width, spatial_scale, sampling_ratio, aligned, quantize
            )
            sample_row, sample_column = np.empty(grid_h * grid_w, np.int64), np.empty(grid_h * grid_w, np.int64)
            for sample in range(grid_h * grid_w):  # a table, not a division per cell
                sample_row[sample], sample_column[sample] = sample // grid_w, sample % grid_w
            for c in range(c0, c1):
                plane = _unsigned((b * channels + c) * plane_size)
                cells = _unsigned((k * channels + c) * num_bins)
                for py in range(pooled_h):
                    for px in range(pooled_w):
                        cell = cells + _unsigned(py * pooled_w + px)
                        s = winners[cell]
                        if s == NO_SAMPLE:
                            continue
                        grad = grads[cell]
                        iy, ix = py * grid_h + sample_row[s], px * grid_w + sample_column[s]
                        row_low, row_high = plane + _unsigned(y_low[iy] * width), plane + _unsigned(y_high[iy] * width)
                        # an outside sample has zero weights: it adds nothing
                        grad_flat[row_low + _unsigned(x_low[ix])] += grad * wy_low[iy] * wx_low[ix]
                        grad_flat[row_low + _unsigned(x_high[ix])] += grad * wy_low[iy] * wx_high[ix]
                        grad_flat[row_high + _unsigned(x_low[ix])] += grad * wy_high[iy] * wx_low[ix]
                        grad_flat[row_high + _unsigned(x_high[ix])] += grad * wy_high[iy] * wx_high[ix]


def _empty_outputs(features, rois, pooled):
    shape = (rois.shape[0], features.shape[1], *pooled)
    output = torch.zeros(shape, dtype=features.dtype, device=features.device)
    argmax = torch.full(shape, NO_SAMPLE, dtype=torch.int32, device=features.device)
    return output, argmax


def _numba_forward(features, rois, params):
    pooled, spatial_scale, sampling_ratio, aligned, quantize, _ = params  # (reduction "max")
    output, argmax = _empty_outputs(features, rois, pooled)
    if output.numel() > 0:
        features_nhwc = features.detach().permute(0, 2, 3, 1)
        if not features_nhwc.is_contiguous():  # free when features are already channels_last
            features_nhwc = features_nhwc.contiguous()
        rois64 = rois.detach().numpy().astype(np.float64)
        rois_by_image, _ = image_order(rois64, features.shape[0])
        _forward_cpu(features_nhwc.numpy(), rois64, rois_by_image, *pooled, spatial_scale, sampling_ratio, aligned,
                     quantize, output.numpy(), argmax.numpy())
    return output, argmax


def _numba_backward(grad_output, argmax, rois, feature_shape, params):
    _, spatial_scale, sampling_ratio, aligned, quantize, _ = params
    grad_features = torch.zeros(feature_shape, dtype=grad_output.dtype)
    if grad_output.numel() > 0:
        rois64 = rois.detach().numpy().astype(np.float64)
        rois_by_image, image_offsets = image_order(rois64, feature_shape[0])
        # enough (image, channel chunk) tasks for every thread, and chunks of at most 16 channels
        threads = numba.get_num_threads()
        chunk = max(1, min(16, -(-feature_shape[1] * feature_shape[0] // (2 * threads))))
        _backward_cpu(grad_output.detach().contiguous().numpy(), argmax.numpy(), rois64, rois_by_image,
                      image_offsets, spatial_scale, sampling_ratio, aligned, quantize, chunk, grad_features.numpy())
    return grad_features


# ---------------------------------------------------------------------------
# 4. CUDA kernels of the max reduction (numba.cuda): one thread per output
#    cell; the backward adds with atomics, as several RoIs may read the same
#    pixel. Under NUMBA_ENABLE_CUDASIM=1 the same kernels run, slowly, on CPU
#    arrays.
#
#    They are RoIAlign's kernels with a max for the mean, and share its layout
#    and device functions (roi_align.py, section 4): the maps as one flat buffer
#    with a level table, so that one launch serves several maps (a pooler's
#    levels); one kernel per float type, all arithmetic in that type (a float32
#    kernel has no float64 operation). The quantized corners are rounded before
#    the launch, in float64 as the reference rounds them (quantized_rois), and
#    the kernels sample them at scale 1: in float32 x * scale could round to
#    another integer, and the rounded corners are exact in float32.
# ---------------------------------------------------------------------------


def _cuda_kernels_in(real):
    """The (forward, backward) Python functions of the max-reduction CUDA kernels in float type `real`."""
    cell_setup, interpolation, sample = cuda_device_functions_in(real)

    def forward(features, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned, output, argmax):
        """features: [T] flat maps; level_table: [L, 3] int64; level_scales: [L]; rois: [K, 5];
        roi_levels: [K] int64 in [0, L); output: [K, C, ph, pw] and argmax (int32) written."""
        num_rois, channels, pooled_h, pooled_w = output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px, height, width, plane, start_y, start_x, bin_h, bin_w, grid_h, grid_w, _ = cell_setup(
                index, output.shape, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned)
            best = real(0.0)
            best_index = NO_SAMPLE
            for iy in range(grid_h):
                y_low, y_high, wy_low, wy_high = interpolation(sample(start_y, py, bin_h, iy, grid_h), height)
                row_low, row_high = plane + y_low * width, plane + y_high * width
                for ix in range(grid_w):
                    x_low, x_high, wx_low, wx_high = interpolation(sample(start_x, px, bin_w, ix, grid_w), width)
                    value = real(0.0)  # outside samples are 0 and do not read the map (0 * inf = NaN)
                    if (wy_low != real(0.0) or wy_high != real(0.0)) and (wx_low != real(0.0) or wx_high != real(0.0)):
                        value = (
                            wy_low * (wx_low * features[row_low + x_low] + wx_high * features[row_low + x_high])
                            + wy_high * (wx_low * features[row_high + x_low] + wx_high * features[row_high + x_high])
                        )
                    if best_index == NO_SAMPLE or value > best:  # strict: the first sample wins ties
                        best = value
                        best_index = iy * grid_w + ix
            output[k, c, py, px] = best
            argmax[k, c, py, px] = best_index

    def backward(grad_output, argmax, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned,
                 grad_features):
        """grad_output, argmax: [K, C, ph, pw]; grad_features: [T] flat zeros (atomically accumulated into)."""
        num_rois, channels, pooled_h, pooled_w = grad_output.shape
        for index in range(cuda.grid(1), num_rois * channels * pooled_h * pooled_w, cuda.gridsize(1)):
            k, c, py, px, height, width, plane, start_y, start_x, bin_h, bin_w, grid_h, grid_w, _ = cell_setup(
                index, grad_output.shape, level_table, level_scales, rois, roi_levels, sampling_ratio, aligned)
            s = argmax[k, c, py, px]
            if s == NO_SAMPLE:
                continue
            y_low, y_high, wy_low, wy_high = interpolation(sample(start_y, py, bin_h, s // grid_w, grid_h), height)
            x_low, x_high, wx_low, wx_high = interpolation(sample(start_x, px, bin_w, s % grid_w, grid_w), width)
            if (wy_low == real(0.0) and wy_high == real(0.0)) or (wx_low == real(0.0) and wx_high == real(0.0)):
                continue  # an outside sample won: no gradient (and no atomics on pixel 0)
            grad = grad_output[k, c, py, px]
            row_low, row_high = plane + y_low * width, plane + y_high * width
            cuda.atomic.add(grad_features, row_low + x_low, grad * wy_low * wx_low)
            cuda.atomic.add(grad_features, row_low + x_high, grad * wy_low * wx_high)
            cuda.atomic.add(grad_features, row_high + x_low, grad * wy_high * wx_low)
            cuda.atomic.add(grad_features, row_high + x_high, grad * wy_high * wx_high)

    return forward, backward


def _cuda_signature(real):
    """(forward, backward) signatures: void(maps [T], level_table, level_scales, rois, roi_levels,
    sampling_ratio, aligned, output, argmax) and void(grad_output, argmax, level_table, ..., grad_maps [T])."""
    flat, table, rois = c_array(real, 1), c_array(np.int64, 2), c_array(real, 2)
    cells, argmax, levels = c_array(real, 4), c_array(np.int32, 4), c_array(np.int64, 1)
    tail = (table, flat, rois, levels, numba.types.int64, numba.types.boolean)
    return numba.types.void(flat, *tail, cells, argmax), numba.types.void(cells, argmax, *tail, flat)


CUDA_KERNELS = lazy_kernels_per_float_type(_cuda_kernels_in, _cuda_signature)  # torch dtype -> (forward, backward) LazyKernels of the max


def _kernel_rois(rois, roi_levels, spatial_scales, quantize, dtype):
    """The RoIs and [L] scales the kernels sample: as given, or (quantize) with corners rounded in
    float64 at their map's scale and scales of 1."""
    if not quantize:
        return rois.detach().to(dtype), spatial_scales
    if len(spatial_scales) == 1:
        scale = spatial_scales[0]
    else:  # each RoI's own map's scale, [K, 1]
        scale = level_scales(spatial_scales, torch.float64, rois.device)[roi_levels][:, None]
    return quantized_rois(rois.detach(), scale).to(dtype), (1.0,) * len(spatial_scales)


def _cuda_forward_levels(features, rois, roi_levels, params):
    """features: L maps; rois: [K, 5]; roi_levels: [K] int64 -> (output, argmax) [K, C, ph, pw], in
    the compute dtype; params = (output_size, spatial_scales, sampling_ratio, aligned, quantize)."""
    pooled, spatial_scales, sampling_ratio, aligned, quantize = params
    dtype, device = CUDA_COMPUTE_DTYPES[features[0].dtype], features[0].device  # (bf16 maps: float32)
    output = torch.zeros((rois.shape[0], features[0].shape[1], *pooled), dtype=dtype, device=device)
    argmax = torch.full(output.shape, NO_SAMPLE, dtype=torch.int32, device=device)
    if output.numel() > 0:
        kernel_rois, scales = _kernel_rois(rois, roi_levels, spatial_scales, quantize, dtype)
        table, _ = level_table([f.shape for f in features], device)
        inputs = (flat_maps([f.detach() for f in features], dtype), table, level_scales(scales, dtype, device),
                  kernel_rois, roi_levels)
        cuda_launch(CUDA_KERNELS[dtype][0], output.numel(), inputs, (sampling_ratio, aligned), (output, argmax),
                    device)
    return output, argmax


def _cuda_backward_levels(grad_output, argmax, rois, roi_levels, feature_shapes, params):
    """-> one gradient per map, [N_l, C, H_l, W_l] views of one flat buffer."""
    _, spatial_scales, sampling_ratio, aligned, quantize = params
    dtype, device = grad_output.dtype, grad_output.device
    table, total = level_table(feature_shapes, device)
    grad_flat = torch.zeros(total, dtype=dtype, device=device)
    if grad_output.numel() > 0:
        kernel_rois, scales = _kernel_rois(rois, roi_levels, spatial_scales, quantize, dtype)
        inputs = (grad_output.detach(), argmax, table, level_scales(scales, dtype, device), kernel_rois, roi_levels)
        cuda_launch(CUDA_KERNELS[dtype][1], grad_output.numel(), inputs, (sampling_ratio, aligned), (grad_flat,),
                    device)
    return split_flat(grad_flat, feature_shapes)


def _cuda_forward(features, rois, params):
    pooled, spatial_scale, sampling_ratio, aligned, quantize, _ = params  # (reduction "max")
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return _cuda_forward_levels([features], rois, roi_levels, (pooled, (spatial_scale,), sampling_ratio, aligned,
                                                               quantize))


def _cuda_backward(grad_output, argmax, rois, feature_shape, params):
    pooled, spatial_scale, sampling_ratio, aligned, quantize, _ = params
    roi_levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    (grad,) = _cuda_backward_levels(grad_output, argmax, rois, roi_levels, [feature_shape],
                                    (pooled, (spatial_scale,), sampling_ratio, aligned, quantize))
    return grad


# ---------------------------------------------------------------------------
# 5. Dispatch: backend -> (forward, backward) with
#    forward(features, rois, params) -> (output, argmax) and
#    backward(grad_output, argmax, rois, feature_shape, params) -> grad_features,
#    params = (output_size, spatial_scale, sampling_ratio, aligned, quantize, reduction).
#    The reference backend keeps the features for its backward (the max needs them).
# ---------------------------------------------------------------------------


def _reference_forward(features, rois, params):
    output = roi_warp_reference(features.detach().numpy(), rois.detach().numpy(), *params)
    return torch.from_numpy(output).to(features.dtype), features.detach()


def _reference_backward(grad_output, saved_features, rois, feature_shape, params):
    grad = roi_warp_backward_reference(saved_features.numpy(), grad_output.detach().numpy(), rois.detach().numpy(),
                                       *params)
    return torch.from_numpy(grad).to(grad_output.dtype)


_BACKENDS = {
    "reference": (_reference_forward, _reference_backward),
    "numba": (_numba_forward, _numba_backward),
    "cuda": (_cuda_forward, _cuda_backward),
}

# ---------------------------------------------------------------------------
# 6. Autograd function and public API.
# ---------------------------------------------------------------------------


class _RoIWarpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, params, backend):
        forward_fn, _ = _BACKENDS[backend]
        output, saved = forward_fn(features, rois, params)
        ctx.save_for_backward(rois, saved)
        ctx.params, ctx.backend, ctx.feature_shape = params, backend, tuple(features.shape)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, saved = ctx.saved_tensors
        _, backward_fn = _BACKENDS[ctx.backend]
        return backward_fn(grad_output, saved, rois, ctx.feature_shape, ctx.params), None, None, None


def roi_warp(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True, quantize=True,
             reduction="avg", backend="auto"):
    """Bilinearly pool each RoI, optionally with RoIPool's quantized corners and/or a max over samples.

    features: [N, C, H, W] float32 or float64
    rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in input-image coordinates, same dtype
    output_size: int or (ph, pw)
    spatial_scale: feature map size / input image size (e.g. 1/16 for stride 16)
    sampling_ratio: samples per bin along each axis; <= 0 means ceil(roi_size / output_size)
    aligned: shift by half a pixel so that pixel centres line up (after quantizing)
    quantize: round the corners to the feature grid as RoIPool does (RoIWarp)
    reduction: "avg" (RoIAlign's mean of the samples) or "max" (the largest sample)
    backend: "auto" (CUDA tensors -> "cuda", CPU -> "numba"), "reference", "numba", "cuda"
    Returns: [K, C, ph, pw], differentiable w.r.t. features.
    """
    pooled = output_size_pair(output_size)
    spatial_scale = check_spatial_scale(spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_features_and_rois(features, rois)
    backend = resolve_backend(backend, features)
    if backend == "cuda":
        check_cuda_backend(features.device)
    if reduction == "avg" and backend != "reference":
        # RoIWarp (ave) is RoIAlign on rounded corners at scale 1: the fast RoIAlign kernels do it
        if quantize:
            rois, spatial_scale = quantized_rois(rois, spatial_scale), 1.0
        return roi_align(features, rois, pooled, spatial_scale, int(sampling_ratio), bool(aligned), backend)
    params = (pooled, spatial_scale, int(sampling_ratio), bool(aligned), bool(quantize), reduction)
    return _RoIWarpFunction.apply(features, rois, params, backend)


def quantized_rois(rois, spatial_scale):
    """rois: [K, 5] -> [K, 5] with each corner round(x * spatial_scale) (C rounding, halves away from
    zero, in float64 as the kernels round), in feature-map coordinates and the rois' dtype."""
    scaled = rois[:, 1:].double() * spatial_scale
    rounded = torch.where(scaled >= 0, torch.floor(scaled + 0.5), -torch.floor(-scaled + 0.5))
    return torch.cat([rois[:, :1], rounded.to(rois.dtype)], dim=1)


class RoIWarp(nn.Module):
    """nn.Module wrapper of roi_warp; forward(features [N,C,H,W], rois [K,5]) -> [K,C,ph,pw]."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True, quantize=True,
                 reduction="avg", backend="auto"):
        super().__init__()
        self.output_size = output_size_pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.quantize = quantize
        self.reduction = reduction
        self.backend = backend

    def forward(self, features, rois):
        return roi_warp(features, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                        self.quantize, self.reduction, self.backend)

    def extra_repr(self):
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, quantize={self.quantize}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


# ---------------------------------------------------------------------------
# 6b. Several maps at once: each RoI pooled from its own map (a pooler's FPN
#     levels). On CUDA one kernel launch for all maps; on CPU one roi_warp call
#     per map, exactly as roi_warp(features[l], rois[roi_levels == l], ...).
# ---------------------------------------------------------------------------


class _RoIWarpMaxLevelsFunction(torch.autograd.Function):
    """The CUDA path of roi_warp_levels with the max reduction: one launch forward, one backward."""

    @staticmethod
    def forward(ctx, rois, roi_levels, params, *features):
        output, argmax = _cuda_forward_levels(list(features), rois, roi_levels, params)
        ctx.save_for_backward(rois, roi_levels, argmax)
        ctx.params = params
        ctx.feature_shapes = [tuple(f.shape) for f in features]
        ctx.feature_dtypes = [f.dtype for f in features]
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, roi_levels, argmax = ctx.saved_tensors
        grads = _cuda_backward_levels(grad_output.contiguous(), argmax, rois, roi_levels, ctx.feature_shapes,
                                      ctx.params)
        # (a map read in bf16 gets its gradient back in bf16, as a cast of the map would give it)
        return (None, None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.feature_dtypes)))


def roi_warp_levels(features, rois, roi_levels, output_size, spatial_scales, sampling_ratio=-1, aligned=True,
                    quantize=True, reduction="avg", backend="auto"):
    """roi_warp of each RoI on its own map: RoI k is pooled from features[roi_levels[k]] at
    spatial_scales[roi_levels[k]]. On CUDA one kernel launch for all maps (a pooler's FPN levels):
    the max kernels of this file, or for "avg" roi_align_levels on the rounded corners.

    features: L tensors [N_l, C, H_l, W_l] (same C, dtype and device; on CUDA also bf16/fp16,
        read into float32 as the maps are gathered)
    rois: [K, 5] (batch_index into its own map, x1, y1, x2, y2); roi_levels: [K] int64 in [0, L)
    spatial_scales: L numbers; the other arguments: as roi_warp's
    Returns: [K, C, ph, pw] in float32/float64 (the maps' type; float32 for bf16/fp16 maps),
    row k equal to roi_warp(features[l], rois[k:k+1], output_size, spatial_scales[l], ...).
    """
    pooled = output_size_pair(output_size)
    spatial_scales = tuple(check_spatial_scale(scale) for scale in spatial_scales)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
        raise TypeError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    compute = check_maps(features, rois, roi_levels, spatial_scales, backend)
    backend = resolve_backend(backend, features[0])
    rois, sampling_ratio, aligned, quantize = rois.detach().to(compute), int(sampling_ratio), bool(aligned), \
        bool(quantize)
    if backend == "cuda":
        check_cuda_backend(features[0].device)
        if reduction == "avg":  # as roi_warp: RoIAlign on the corners rounded at their map's scale
            rois, scales = _kernel_rois(rois, roi_levels, spatial_scales, quantize, compute)
            return roi_align_levels(features, rois, roi_levels, pooled, scales, sampling_ratio, aligned, backend)
        params = (pooled, spatial_scales, sampling_ratio, aligned, quantize)
        return _RoIWarpMaxLevelsFunction.apply(rois, roi_levels, params, *features)
    output = features[0].new_zeros((rois.shape[0], features[0].shape[1], *pooled))
    for level, (level_features, spatial_scale) in enumerate(zip(features, spatial_scales)):
        rows = torch.nonzero(roi_levels == level).flatten()
        if rows.numel() > 0:
            pooled_rows = roi_warp(level_features, rois[rows], pooled, spatial_scale, sampling_ratio, aligned, quantize,
                                   reduction, backend)
            output = output.index_copy(0, rows, pooled_rows)
    return output


__all__ = ["RoIWarp", "quantized_rois", "roi_warp", "roi_warp_levels", "roi_warp_reference",
           "roi_warp_backward_reference", "warp_geometry"]
