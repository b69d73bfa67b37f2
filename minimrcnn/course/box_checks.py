"""Checkers for notebook 03: IoU, the box coder (encode and decode), greedy NMS."""

from __future__ import annotations

import torch

from minimrcnn.course.harness import Case, compare_arrays, run_checks
from minimrcnn.ops.boxes import BoxCoder, box_iou, nms


def _random_boxes(generator, count, extent=50.0, max_side=30.0):
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * extent
    sides = torch.rand(count, 2, generator=generator, dtype=torch.float64) * max_side + 0.5
    return torch.cat([corners, corners + sides], dim=1)


def _iou_cases() -> list[Case]:
    plus_one = "no '+1' in widths: a box's width is x2 - x1 (continuous coordinates, not pixel indices)."
    clamp = "clamp the overlap's width and height at 0 separately before multiplying."
    generator = torch.Generator().manual_seed(4)
    t = lambda rows: torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)  # noqa: E731
    pairs = [
        ("two 10x10 boxes shifted by 5 in x", t([[0, 0, 10, 10]]), t([[5, 0, 15, 10]]), plus_one),
        ("a box against itself and a box inside it", t([[0, 0, 4, 4]]), t([[0, 0, 4, 4], [1, 1, 3, 3]]), plus_one),
        ("boxes that only touch along an edge", t([[0, 0, 2, 2]]), t([[2, 0, 4, 2]]), "touching boxes have IoU 0"),
        ("far-apart boxes, overlapping in x only", t([[0, 0, 2, 2]]), t([[1, 5, 3, 9]]), clamp),
        ("a zero-area box against itself", t([[3, 3, 3, 3]]), t([[3, 3, 3, 3], [0, 0, 6, 6]]),
         "when the union is 0 the IoU is defined as 0 (not NaN)"),
        ("no boxes on one side", t([]), t([[0, 0, 1, 1]]), "N = 0 gives an empty [0, M] result"),
        ("no boxes on either side", t([]), t([]), "the result has shape [0, 0]"),
        ("3 x 4 random boxes", _random_boxes(generator, 3), _random_boxes(generator, 4), plus_one),
        ("20 x 7 random boxes", _random_boxes(generator, 20), _random_boxes(generator, 7), plus_one),
    ]
    return [Case(text, (a, b), box_iou(a, b), hint=hint) for text, a, b, hint in pairs]


def check_box_iou(student_fn, **options):
    """student_fn(boxes_a [N, 4], boxes_b [M, 4]) -> IoU matrix [N, M] (xyxy float tensors)."""
    return run_checks("box_iou", student_fn, _iou_cases(),
                      compare_arrays(atol=1e-6, dtype_kind="f", tensor=True), **options)


def _coder_inputs():
    generator = torch.Generator().manual_seed(5)
    proposals = _random_boxes(generator, 12)
    gt = _random_boxes(generator, 12)
    fixed_p = torch.tensor([[0, 0, 10, 20], [5, 5, 15, 15]], dtype=torch.float64)
    fixed_g = torch.tensor([[0, 0, 10, 20], [7, 3, 27, 13]], dtype=torch.float64)
    return [("identical boxes (all deltas 0)", fixed_p[:1], fixed_g[:1], (1.0, 1.0, 1.0, 1.0)),
            ("a shifted, stretched box", fixed_p[1:], fixed_g[1:], (1.0, 1.0, 1.0, 1.0)),
            ("12 random pairs, RPN weights", proposals, gt, (1.0, 1.0, 1.0, 1.0)),
            ("12 random pairs, box-head weights (10, 10, 5, 5)", proposals, gt, (10.0, 10.0, 5.0, 5.0)),
            ("no boxes", proposals[:0], gt[:0], (10.0, 10.0, 5.0, 5.0))]


def _encode_cases() -> list[Case]:
    hint = ("dx = wx (gt_cx - cx) / w, dw = ww log(gt_w / w), with centres cx = x1 + w / 2 and "
            "w = x2 - x1 (no +1); the weights multiply.")
    return [Case(text, (p, g, w), BoxCoder(w).encode(p, g), hint=hint) for text, p, g, w in _coder_inputs()]


def check_encode_boxes(student_fn, **options):
    """student_fn(proposals [R, 4], gt_boxes [R, 4], weights (wx, wy, ww, wh)) -> deltas [R, 4]."""
    return run_checks("encode_boxes", student_fn, _encode_cases(),
                      compare_arrays(atol=1e-6, dtype_kind="f", tensor=True), **options)


def _decode_cases() -> list[Case]:
    hint = "divide the deltas by the weights; centre = dx * w + cx; width = exp(dw) * w; corners = centre -+ width / 2."
    clamp = "clamp dw and dh from above at log(1000 / 16) before exp (only from above: shrinking is fine)."
    cases = []
    for text, p, g, w in _coder_inputs():
        deltas = BoxCoder(w).encode(p, g)
        cases.append(Case(text, (deltas, p, w), BoxCoder(w).decode(deltas, p), hint=hint))
    p = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float64)
    huge = torch.tensor([[0.0, 0.0, 20.0, -20.0], [1.0, -1.0, 4.5, 3.0]], dtype=torch.float64)
    cases.append(Case("deltas so large that exp() would explode, and very negative ones", (huge, p, (1.0,) * 4),
                      BoxCoder((1.0,) * 4).decode(huge, p), hint=clamp))
    return cases


def check_decode_boxes(student_fn, **options):
    """student_fn(deltas [R, 4], proposals [R, 4], weights) -> boxes [R, 4] (dw, dh clamped at log(1000/16))."""
    return run_checks("decode_boxes", student_fn, _decode_cases(),
                      compare_arrays(atol=1e-5, rtol=1e-6, dtype_kind="f", tensor=True), **options)


def _nms_cases() -> list[Case]:
    strict = "suppress a box only when its IoU with a kept box is strictly greater than the threshold (>, not >=)."
    order = "visit boxes by decreasing score; return the kept indices in that order."
    ties = "equal scores keep their input order (a stable sort: torch.argsort(..., stable=True))."
    t = lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)  # noqa: E731
    generator = torch.Generator().manual_seed(6)
    cases = [
        ("three boxes, two overlapping", t([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]),
         torch.tensor([0.9, 0.8, 0.7]), 0.5, order),
        ("the best box comes last", t([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12]]),
         torch.tensor([0.1, 0.2, 0.9]), 0.5, order),
        ("two boxes with IoU exactly 0.5", t([[0, 0, 3, 1], [1, 0, 4, 1]]), torch.tensor([0.9, 0.8]), 0.5, strict),
        ("a chain: A suppresses B, B would have suppressed C", t([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]]),
         torch.tensor([0.9, 0.8, 0.7]), 0.3,
         "a suppressed box suppresses nothing: C survives because B was removed before its turn"),
        ("equal scores", t([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]), torch.tensor([0.5, 0.5, 0.5]), 0.5, ties),
        ("no boxes", t([]), torch.zeros(0), 0.5, "return an empty int64 tensor"),
        ("one box", t([[1, 1, 2, 2]]), torch.tensor([0.3]), 0.7, order),
    ]
    for count, threshold in [(30, 0.5), (60, 0.7), (40, 0.3)]:
        boxes = _random_boxes(generator, count, extent=40.0).float()
        scores = torch.rand(count, generator=generator)
        cases.append((f"{count} random boxes, threshold {threshold}", boxes, scores, threshold, order))
    return [Case(text, (b, s, th), nms(b, s, th), hint=hint) for text, b, s, th, hint in cases]


def check_nms(student_fn, **options):
    """student_fn(boxes [N, 4], scores [N], iou_threshold) -> kept indices [K] int64, best first."""
    return run_checks("nms", student_fn, _nms_cases(), compare_arrays(dtype_kind="i", tensor=True), **options)
