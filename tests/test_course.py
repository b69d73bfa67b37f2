"""The course's exercise checkers, the exercise cells and the student edition.

Each checker must accept the package's own implementation, reject a plausible wrong one
(with the hint a student needs), and reject the student stub with a friendly message.
"""

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minimrcnn.course as course
from minimrcnn.course import ablation_checks, backbone_checks, data_checks, eval_checks, panoptic_checks, roi_checks
from minimrcnn.course.harness import ExerciseFailed, run_checks, Case, compare_exact
from minimrcnn.course.student import BEGIN, END, STUB, stub_solutions, student_notebook, write_student_edition
from minimrcnn.data.shapes import uncompressed_rle
from minimrcnn.evaluation.coco_ap import interpolate_precision, match_detections
from minimrcnn.modeling.mask_head import mask_loss
from minimrcnn.modeling.masks import paste_masks_in_image
from minimrcnn.modeling.poolers import assign_boxes_to_levels
from minimrcnn.modeling.sampling import subsample_labels
from minimrcnn.ops import roi_align
from minimrcnn.ops.boxes import BoxCoder, box_iou, nms
from minimrcnn.ops.roi_align import roi_align_sample_points
from minimrcnn.ops.roi_pool import roi_pool_bins


@pytest.fixture(autouse=True)
def lenient_checkers(monkeypatch):
    """Checkers print and return here; a test that wants strict mode says so. (``make test``
    runs these tests in the same pytest as the notebooks, whose conftest.py turns strict on.)"""
    monkeypatch.delenv("MINIMRCNN_COURSE_STRICT", raising=False)


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


# ----------------------------------------------------------------- the package's answers

def _package_roi_warp(features, rois, output_size, spatial_scale):
    try:
        from minimrcnn.ops.roi_warp import roi_warp
    except ImportError:
        return ablation_checks.roi_warp_reference(features, rois, output_size, spatial_scale)
    return roi_warp(features, rois, output_size, spatial_scale=spatial_scale, sampling_ratio=2, aligned=True)


def _no_flags(ious):
    return np.zeros(np.asarray(ious).shape[1], dtype=bool)


PACKAGE = {
    "check_rle_counts": lambda mask: uncompressed_rle(mask)["counts"],
    "check_polygon_area": data_checks.polygon_area_reference,
    "check_bilinear": roi_checks.bilinear_reference,
    "check_roi_pool_bins": lambda roi, h, w, size, spatial_scale=1.0: [
        tuple(b[2:]) for b in roi_pool_bins(roi, h, w, size, spatial_scale)],
    "check_roi_align_sample_grid": roi_align_sample_points,
    "check_residual_block_output_shape": backbone_checks.residual_block_output_shape_reference,
    "check_pyramid_shapes": backbone_checks.pyramid_shapes_reference,
    "check_box_iou": box_iou,
    "check_encode_boxes": lambda p, g, w: BoxCoder(w).encode(p, g),
    "check_decode_boxes": lambda d, p, w: BoxCoder(w).decode(d, p),
    "check_nms": nms,
    "check_subsample_labels": lambda labels, n, f: subsample_labels(labels, n, f, bg_label=0),
    "check_fpn_level": lambda boxes: assign_boxes_to_levels(boxes, 2, 5),
    "check_mask_loss": lambda logits, classes, targets: mask_loss(logits, classes, targets, "sigmoid"),
    "check_paste_mask": lambda probs, box, size: paste_masks_in_image(probs[None], box[None], size)[0],
    "check_average_precision": lambda r, p: float(interpolate_precision(np.asarray(r), np.asarray(p)).mean()),
    "check_match_detections": lambda ious, t: match_detections(np.asarray(ious), _no_flags(ious), _no_flags(ious), t),
    "check_pq_match": panoptic_checks.pq_match_reference,
    "check_fuse_things": panoptic_checks.fuse_things_reference,
    "check_roi_warp": _package_roi_warp,
    "check_softmax_mask_loss": lambda logits, classes, targets: mask_loss(logits, classes, targets, "softmax"),
}


# ----------------------------------------------------------------- plausible wrong answers

def _iou_plus_one(a, b):  # the legacy +1 pixel convention
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2]) + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def _nms_greater_equal(boxes, scores, threshold):
    order = torch.argsort(scores, descending=True, stable=True)
    ious, suppressed, kept = box_iou(boxes, boxes), torch.zeros(len(boxes), dtype=torch.bool), []
    for i in order.tolist():
        if not suppressed[i]:
            kept.append(i)
            suppressed |= ious[i] >= threshold
    return torch.tensor(kept, dtype=torch.int64)


def _bins_python_round(roi, h, w, size, spatial_scale=1.0):
    x1, y1, x2, y2 = (round(v * spatial_scale) for v in roi[1:])  # rounds halves to even
    return [tuple(b[2:]) for b in roi_pool_bins([0, x1, y1, x2, y2], h, w, size, 1.0)]


def _bilinear_no_border(image, y, x):  # the notebook's straw man
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[y0, x0] + (1 - ly) * lx * image[y0, x0 + 1]
            + ly * (1 - lx) * image[y0 + 1, x0] + ly * lx * image[y0 + 1, x0 + 1])


def _mask_loss_all_channels(logits, classes, targets):
    if len(classes) == 0:
        return 0.0
    return F.binary_cross_entropy_with_logits(logits, targets[:, None].expand_as(logits).to(logits.dtype))


def _ap_without_envelope(recall, precision):
    if len(recall) == 0:
        return 0.0
    positions = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(positions < len(recall), np.asarray(precision)[np.minimum(positions, len(recall) - 1)], 0).mean())


def _match_strict(ious, threshold):  # '>' at the threshold instead of '>='
    return PACKAGE["check_match_detections"](ious, threshold + 1e-12)


def _paste_no_half_pixel(probs, box, size):
    return paste_masks_in_image(probs[None], (box - 0.5)[None], size)[0]  # pixel corners taken as centres


def _fuse_no_overlap_rule(masks, scores):
    return panoptic_checks.fuse_things_reference(masks, scores, overlap_thresh=1.0)


def _roi_warp_python_round(features, rois, output_size, spatial_scale):
    quantized = rois.clone()
    quantized[:, 1:] = torch.round(rois[:, 1:] * spatial_scale)  # halves to even
    return roi_align(features, quantized, output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def _sampling_no_fill(labels, n, f):  # background does not fill in for missing foreground
    positive, negative = subsample_labels(labels, n, f, bg_label=0)
    return positive, negative[: n - int(n * f)]


WRONG = {
    "check_rle_counts": [lambda mask: uncompressed_rle(np.asarray(mask).T)["counts"],  # row by row
                         lambda mask: [c for c in uncompressed_rle(mask)["counts"] if c > 0]],  # no leading 0
    "check_polygon_area": [lambda p: float(np.dot(p[0::2], np.roll(p[1::2], -1)) - np.dot(p[1::2], np.roll(p[0::2], -1))) / 2],
    "check_bilinear": [_bilinear_no_border],
    "check_roi_pool_bins": [_bins_python_round],
    "check_roi_align_sample_grid": [lambda roi, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True:
                                    roi_align_sample_points(roi, size, spatial_scale, sampling_ratio, False)],
    "check_residual_block_output_shape": [lambda s, planes, stride, bottleneck=False:
                                          (s[0], planes * (4 if bottleneck else 1), s[2] // stride, s[3] // stride)],
    "check_pyramid_shapes": [lambda h, w, levels: {level: (h // 2**level, w // 2**level) for level in levels}],
    "check_box_iou": [_iou_plus_one],
    "check_encode_boxes": [lambda p, g, w: BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(p, g)],  # weights forgotten
    "check_decode_boxes": [lambda d, p, w: BoxCoder(w, scale_clamp=math.inf).decode(d, p)],  # no clamp
    "check_nms": [_nms_greater_equal, lambda b, s, t: nms(b, s, t).flip(0)],
    "check_subsample_labels": [_sampling_no_fill],
    "check_fpn_level": [lambda b: torch.round(4 + torch.log2(torch.sqrt(
        (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / 224 + 1e-8)).clamp(2, 5).long()],
    "check_mask_loss": [_mask_loss_all_channels],
    "check_paste_mask": [_paste_no_half_pixel],
    "check_average_precision": [_ap_without_envelope],
    "check_match_detections": [_match_strict],
    "check_pq_match": [lambda i, p, g, v: i / (p + g - i - v) >= 0.5, lambda i, p, g, v: i / (p + g - i) > 0.5],
    "check_fuse_things": [_fuse_no_overlap_rule],
    "check_roi_warp": [_roi_warp_python_round],
    "check_softmax_mask_loss": [lambda logits, classes, targets: mask_loss(logits, classes, targets, "sigmoid")],
}

ALL_CHECKERS = sorted(name for names in course.CHECKERS.values() for name in names)


def test_every_checker_has_a_package_answer_and_a_wrong_one():
    assert ALL_CHECKERS == sorted(PACKAGE) == sorted(WRONG)
    assert len(ALL_CHECKERS) >= 18 and all(len(names) >= 2 for names in course.CHECKERS.values())


@pytest.mark.parametrize("name", ALL_CHECKERS)
def test_checker_accepts_the_package(name, capsys):
    # A generous time limit: a loaded test machine must not fail the package (slow calls: see below).
    result = getattr(course, name)(PACKAGE[name], time_limit=120.0)
    assert result.passed, result.message
    assert re.search(r"✓ .*: \d+ cases passed", capsys.readouterr().out)


@pytest.mark.parametrize("name", ALL_CHECKERS)
def test_checker_rejects_plausible_wrong_answers(name, capsys):
    for wrong in WRONG[name]:
        result = getattr(course, name)(wrong, time_limit=120.0)
        assert not result.passed
        out = capsys.readouterr().out
        assert out.startswith("✗") and "Traceback" not in out
        if "raised" not in out:  # a wrong value: the report names input, expected and obtained
            assert "input:" in out and "expected" in out and "obtained" in out, out


@pytest.mark.parametrize("name", ALL_CHECKERS)
def test_checker_rejects_the_stub_with_a_friendly_message(name, capsys):
    def stub(*args, **kwargs):
        raise NotImplementedError("your code here")

    result = getattr(course, name)(stub)
    assert not result.passed and "not written yet" in capsys.readouterr().out


# ----------------------------------------------------------------- the harness

def _cases():
    return [Case("two and two", (2, 2), 4, hint="add them")]


def test_a_raising_function_gets_a_message_not_a_traceback(capsys):
    result = run_checks("add", lambda a, b: [][a], _cases(), compare_exact)
    out = capsys.readouterr().out
    assert not result and "raised IndexError" in out and "hint: add them" in out


def test_wrong_shape_dtype_and_none_are_named(capsys):
    assert not course.check_box_iou(lambda a, b: torch.zeros(len(a)))
    assert "wrong shape" in capsys.readouterr().out
    assert not course.check_box_iou(lambda a, b: box_iou(a, b).numpy())
    assert "expected a torch.Tensor" in capsys.readouterr().out
    assert not course.check_nms(lambda b, s, t: nms(b, s, t).float())
    assert "wrong dtype" in capsys.readouterr().out
    assert not course.check_polygon_area(lambda polygon: None)
    assert "returned None" in capsys.readouterr().out
    assert not course.check_box_iou(box_iou(torch.zeros(1, 4), torch.zeros(1, 4)))
    assert "expected a function" in capsys.readouterr().out


def test_a_slow_function_is_stopped_with_a_message(capsys):
    def endless(a, b):
        while True:
            time.sleep(0.01)

    start = time.perf_counter()
    result = run_checks("add", endless, _cases(), compare_exact, time_limit=0.2)
    assert not result and "took more than 0.2 s" in capsys.readouterr().out
    assert time.perf_counter() - start < 5  # interrupted, not waited for


def test_strict_mode_raises_and_the_environment_turns_it_on(monkeypatch, capsys):
    monkeypatch.delenv("MINIMRCNN_COURSE_STRICT", raising=False)
    assert not run_checks("add", lambda a, b: a - b, _cases(), compare_exact)
    with pytest.raises(ExerciseFailed, match="expected 4, got 0"):
        run_checks("add", lambda a, b: a - b, _cases(), compare_exact, strict=True)
    monkeypatch.setenv("MINIMRCNN_COURSE_STRICT", "1")
    with pytest.raises(ExerciseFailed):
        run_checks("add", lambda a, b: a - b, _cases(), compare_exact)
    assert run_checks("add", lambda a, b: a + b, _cases(), compare_exact)


def test_checking_leaves_the_global_random_state_alone():
    torch.manual_seed(3)
    np.random.seed(3)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(3)
    np.random.seed(3)
    course.check_subsample_labels(PACKAGE["check_subsample_labels"], quiet=True)
    course.check_pyramid_shapes(PACKAGE["check_pyramid_shapes"], quiet=True)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


# ----------------------------------------------------------------- exercise cells and the student edition

def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell):
    return "".join(cell["source"])


def _exercises(path):
    """(exercise cell, the checker its next cell calls, the function passed) of one notebook."""
    cells = _cells(path)
    found = []
    for index, cell in enumerate(cells):
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            call = re.search(r"\b(check_\w+)\((my_\w+)\)", _source(cells[index + 1]))
            assert call, f"{path.name}, cell {index}: the next cell must call a checker"
            found.append((cell, call.group(1), call.group(2)))
    return found


def test_every_notebook_has_at_least_two_tagged_exercises_with_checkers():
    lessons = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))  # 00-08; appendices (A1_...) have none
    assert [p.name[:2] for p in lessons] == [f"{k:02d}" for k in range(9)]
    for path in lessons:
        exercises = _exercises(path)
        assert len(exercises) >= 2, path.name
        for cell, checker, _ in exercises:
            assert BEGIN in _source(cell) and END in _source(cell)
            assert checker in course.CHECKERS[path.stem], (path.name, checker)


def test_the_solved_exercises_pass_their_checkers():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell, checker, function in _exercises(path):
            namespace = {}
            exec(_source(cell), namespace)  # exercise cells import what they use
            result = getattr(course, checker)(namespace[function], quiet=True, time_limit=120.0)
            assert result.passed, f"{path.name}: {result.message}"


def test_student_edition_is_valid_and_keeps_no_solution(tmp_path, capsys):
    nbformat = pytest.importorskip("nbformat")
    written = write_student_edition(NOTEBOOKS, tmp_path)
    assert [p.name for p in written] == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for path in written:
        nbformat.validate(nbformat.read(path, as_version=4))
        text = path.read_text(encoding="utf-8")
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        solved, student = _cells(NOTEBOOKS / path.name), _cells(path)
        assert len(solved) == len(student)
        for before, after in zip(solved, student):
            if after["cell_type"] == "code":
                assert after["outputs"] == [] and after["execution_count"] is None
            if BEGIN not in _source(before):
                assert _source(before) == _source(after)  # everything else unchanged
                continue
            region = _source(before).split(BEGIN, 1)[1].split(END, 1)[0]
            solution_lines = [line.strip() for line in region.splitlines() if line.strip()]
            student_lines = {line.strip() for line in _source(after).splitlines()}
            assert not student_lines & set(solution_lines), path.name
            assert STUB in _source(after)
        for cell, checker, function in _exercises(path):  # the stubs are rejected kindly
            namespace = {}
            exec(_source(cell), namespace)
            result = getattr(course, checker)(namespace[function])
            assert not result.passed and "not written yet" in capsys.readouterr().out


def test_stub_solutions_keeps_indentation_and_rejects_broken_markers():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert stub_solutions(source) == f"def f(x):\n    y = 1\n    {STUB}\n"
    with pytest.raises(ValueError, match="without"):
        stub_solutions("### BEGIN SOLUTION\nx = 1\n")
    with pytest.raises(ValueError, match="without"):
        stub_solutions("x = 1\n### END SOLUTION\n")
    untagged = {"cells": [{"cell_type": "code", "metadata": {}, "source": [source], "outputs": [],
                           "execution_count": 1}]}
    with pytest.raises(ValueError, match="not tagged"):
        student_notebook(untagged)


def test_student_command_line(tmp_path):
    from minimrcnn.course.student import main

    assert main(["--source", str(NOTEBOOKS), "--out", str(tmp_path / "student")]) == 0
    assert main(["--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 1
