"""Checkers for notebook 00 (the data): RLE by hand and the shoelace polygon area."""

from __future__ import annotations

import numpy as np

from minimrcnn.course.harness import Case, compare_exact, compare_scalar, run_checks
from minimrcnn.data.shapes import uncompressed_rle


def _rle_cases() -> list[Case]:
    hint_first = "COCO's runs always start with background: a mask whose first pixel is 1 starts with a run of 0."
    hint_order = "read the mask column by column (Fortran order, mask.T.flatten() or reshape(-1, order='F'))."
    fixed = [
        ("the 3x4 mask of the lesson", np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0]]), hint_order),
        ("a mask whose first pixel is foreground", np.array([[1, 0], [1, 1]]), hint_first),
        ("an all-zero 2x3 mask", np.zeros((2, 3), dtype=np.uint8), "one run of 6 zeros: [6]"),
        ("an all-one 3x2 mask", np.ones((3, 2), dtype=np.uint8), hint_first),
        ("a single foreground pixel", np.ones((1, 1), dtype=np.uint8), hint_first),
        ("a 2x3 mask where rows and columns disagree", np.array([[1, 1, 0], [0, 0, 0]]), hint_order),
        ("a bool mask", np.array([[False, True], [True, True]]), "bool masks work like 0/1 masks"),
    ]
    generator = np.random.default_rng(0)
    for height, width in [(5, 7), (8, 3), (1, 9), (9, 1)]:
        mask = (generator.random((height, width)) < 0.4).astype(np.uint8)
        fixed.append((f"a random {height}x{width} mask", mask, hint_order))
    return [Case(f"{text}:\n{mask.astype(int)}", (mask,), uncompressed_rle(mask)["counts"], hint=hint)
            for text, mask, hint in fixed]


def check_rle_counts(student_fn, **options):
    """student_fn(mask [H, W] of 0/1) -> list of run lengths (COCO uncompressed RLE counts)."""
    return run_checks("rle_counts", student_fn, _rle_cases(), compare_exact, **options)


def polygon_area_reference(polygon) -> float:
    """Shoelace area of one COCO polygon [x0, y0, x1, y1, ...] (float64, always >= 0)."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _polygon_cases() -> list[Case]:
    orientation = "the signed shoelace sum is negative for one orientation: take its absolute value."
    fixed = [
        ("a 4x3 rectangle, counter-clockwise in image coordinates", [0, 0, 0, 3, 4, 3, 4, 0], orientation),
        ("the same rectangle the other way round", [0, 0, 4, 0, 4, 3, 0, 3], orientation),
        ("a right triangle with legs 4 and 2", [1, 1, 5, 1, 1, 3], "half of |sum x_i y_(i+1) - x_(i+1) y_i|"),
        ("a triangle with fractional corners", [0.5, 0.5, 10.25, 2.0, 3.0, 7.75], ""),
        ("three points on a line (area 0)", [0, 0, 1, 1, 2, 2], ""),
        ("an L-shaped (non-convex) hexagon", [0, 0, 4, 0, 4, 1, 1, 1, 1, 4, 0, 4],
         "the shoelace formula works for any simple polygon, convex or not"),
        ("a square far from the origin", [100, 100, 102, 100, 102, 102, 100, 102],
         "do not forget the edge from the last corner back to the first"),
    ]
    generator = np.random.default_rng(1)
    for sides in (5, 8, 12):
        angles = np.sort(generator.uniform(0, 2 * np.pi, sides))
        radii = generator.uniform(5, 20, sides)
        polygon = np.stack([40 + radii * np.cos(angles), 40 + radii * np.sin(angles)], 1).ravel().tolist()
        fixed.append((f"a random star-shaped polygon with {sides} corners", polygon,
                      "do not forget the edge from the last corner back to the first"))
    return [Case(f"{text}: {np.round(poly, 2).tolist()}", (list(poly),), polygon_area_reference(poly), hint=hint)
            for text, poly, hint in fixed]


def check_polygon_area(student_fn, **options):
    """student_fn(polygon as a flat list [x0, y0, x1, y1, ...]) -> its area (a float)."""
    return run_checks("polygon_area", student_fn, _polygon_cases(), compare_scalar(atol=1e-6), **options)
