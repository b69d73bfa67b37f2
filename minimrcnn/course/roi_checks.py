"""Checkers for notebook 01: bilinear sampling, RoIPool's bins, RoIAlign's sample grid."""

from __future__ import annotations

import importlib

import numpy as np

from minimrcnn.course.harness import Case, compare_arrays, compare_exact, compare_scalar, run_checks
from minimrcnn.ops.roi_align import roi_align_sample_points
from minimrcnn.ops.roi_pool import roi_pool_bins

_roi_align_module = importlib.import_module("minimrcnn.ops.roi_align")


def bilinear_reference(image, y, x) -> float:
    """One bilinear sample of a [H, W] map with RoIAlign's border rules (float64)."""
    image = np.asarray(image, dtype=np.float64)
    taps = _roi_align_module._reference_bilinear_taps(float(y), float(x), *image.shape)
    return float(sum(weight * image[row, col] for row, col, weight in taps))


def _bilinear_cases() -> list[Case]:
    image = np.arange(20, dtype=np.float64).reshape(4, 5) ** 1.5  # not linear: every weight matters
    inside = "the four taps: (y0,x0) (y0,x0+1) (y0+1,x0) (y0+1,x0+1) with weights (1-ly)(1-lx), (1-ly)lx, ly(1-lx), ly lx."
    border = ("past the last row/column (y >= H-1) clamp to it: y_low = y_high = H-1; "
              "between -1 and 0 read at 0.")
    outside = "a sample outside [-1, H] x [-1, W] contributes 0."
    points = [
        (1.25, 2.5, inside), (0.0, 0.0, inside), (2.0, 3.0, "an integer point is exactly that pixel"),
        (0.7, 3.9, inside), (3.0, 1.5, border), (3.6, 4.2, border), (-0.5, 1.5, border),
        (1.5, -1.0, border), (4.0, 5.0, border), (-1.5, 2.0, outside), (2.0, 5.5, outside), (7.0, -3.0, outside),
    ]
    generator = np.random.default_rng(2)
    points += [(float(y), float(x), inside) for y, x in generator.uniform(-0.9, 3.9, (6, 2))]
    return [Case(f"sample the 4x5 map at y = {y:g}, x = {x:g}", (image, y, x), bilinear_reference(image, y, x),
                 hint=hint) for y, x, hint in points]


def check_bilinear(student_fn, **options):
    """student_fn(image [H, W] array, y, x) -> the bilinear sample (a float), RoIAlign's border rules."""
    return run_checks("bilinear", student_fn, _bilinear_cases(), compare_scalar(atol=1e-9), **options)


def _roi_pool_bin_cases() -> list[Case]:
    rounding = ("corners are rounded with C's round(): halves away from zero (2.5 -> 3). Python's round() "
                "and np.round() round halves to even (2.5 -> 2).")
    edges = "bin p covers floor(p * bin) .. ceil((p + 1) * bin) (end exclusive) from the rounded start, bin = size / pooled."
    size = "the RoI has end - start + 1 pixels (both corners are pixel indices), at least 1."
    clip = "every edge is clipped to [0, H] (rows) and [0, W] (columns)."
    rois = [
        ([0, 2.3, 1.6, 6.8, 5.2], (8, 10), (2, 2), 1.0, edges),
        ([0, 2.5, 0.5, 5.5, 3.5], (8, 10), (2, 2), 1.0, rounding),
        ([0, 1.0, 1.0, 7.0, 4.0], (8, 10), (3, 3), 1.0, size),
        ([0, 0.0, 0.0, 9.0, 7.0], (8, 10), (7, 7), 1.0, edges),
        ([0, 4.0, 4.0, 4.0, 4.0], (8, 10), (2, 2), 1.0, size),
        ([0, 6.0, 5.0, 3.0, 2.0], (8, 10), (2, 3), 1.0, size + " (a box with x2 < x1 still has 1 pixel)"),
        ([0, 7.0, 5.0, 14.0, 12.0], (8, 10), (2, 2), 1.0, clip),
        ([0, -3.0, -2.0, 2.0, 3.0], (8, 10), (2, 2), 1.0, clip),
        ([0, 20.0, 24.0, 60.0, 56.0], (8, 10), (2, 2), 0.125, "multiply the corners by spatial_scale first, then round"),
        ([0, 36.0, 4.0, 52.0, 20.0], (8, 10), (2, 2), 0.125, rounding + " Here 36 * 0.125 = 4.5."),
    ]
    generator = np.random.default_rng(3)
    for _ in range(6):
        x1, y1 = generator.uniform(-2, 8, 2)
        w, h = generator.uniform(0, 9, 2)
        rois.append(([0, float(x1), float(y1), float(x1 + w), float(y1 + h)], (9, 11), (3, 2), 1.0, edges))
    cases = []
    for roi, (height, width), output_size, scale, hint in rois:
        expected = [tuple(b[2:]) for b in roi_pool_bins(roi, height, width, output_size, scale)]
        cases.append(Case(f"RoI {roi} on a {height}x{width} map, output {output_size}, spatial_scale {scale}",
                          (roi, height, width, output_size), expected, kwargs={"spatial_scale": scale}, hint=hint))
    return cases


def check_roi_pool_bins(student_fn, **options):
    """student_fn(roi (b, x1, y1, x2, y2), height, width, output_size (ph, pw), spatial_scale=1.0)
    -> list of (row_start, row_end, col_start, col_end), ends exclusive, bins in row-major order."""
    return run_checks("roi_pool_bins", student_fn, _roi_pool_bin_cases(), compare_exact, **options)


def _sample_grid_cases() -> list[Case]:
    offset = "with aligned=True the box moves by half a pixel first: start = x1 * scale - 0.5."
    centres = "sample (iy, ix) of bin (py, px) sits at start + p * bin + (i + 0.5) * bin / grid."
    adaptive = "sampling_ratio <= 0 means ceil(roi_size / output_size) samples per bin, separately for h and w."
    legacy = "with aligned=False a RoI smaller than 1 pixel is stretched to 1 (max(roi_w, 1))."
    settings = [
        ([0, 2.3, 1.6, 6.8, 5.2], (2, 2), 2, True, offset),
        ([0, 2.3, 1.6, 6.8, 5.2], (2, 2), 2, False, centres),
        ([0, 1.0, 1.0, 3.0, 3.0], (4, 4), 1, False, centres),
        ([0, 0.0, 0.0, 10.0, 4.0], (2, 2), 0, True, adaptive),
        ([0, 8.0, 16.0, 40.0, 48.0], (2, 3), 2, True, "multiply the corners by spatial_scale first"),
        ([0, 3.0, 4.0, 3.4, 4.2], (2, 2), 1, False, legacy),
        ([0, 3.0, 4.0, 3.4, 4.2], (2, 2), 1, True, "with aligned=True tiny RoIs keep their size"),
        ([0, -4.0, -2.0, 3.0, 5.0], (3, 3), 2, True, "boxes partly outside the map are sampled like any other"),
    ]
    cases = []
    for roi, output_size, ratio, aligned, hint in settings:
        scale = 0.25 if roi[1] == 8.0 else 1.0
        expected = roi_align_sample_points(roi, output_size, scale, ratio, aligned)
        cases.append(Case(f"RoI {roi}, output {output_size}, sampling_ratio {ratio}, aligned={aligned}, "
                          f"spatial_scale {scale}", (roi, output_size),
                          expected, kwargs={"spatial_scale": scale, "sampling_ratio": ratio, "aligned": aligned},
                          hint=hint))
    return cases


def check_roi_align_sample_grid(student_fn, **options):
    """student_fn(roi, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    -> array [ph, pw, grid_h * grid_w, 2] of (y, x) sample points, samples in row-major order."""
    return run_checks("roi_align_sample_grid", student_fn, _sample_grid_cases(),
                      compare_arrays(atol=1e-9, rtol=0), **options)
