"""Per-class AP, class-agnostic AP and the confusion matrix, judged by pycocotools."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimrcnn.evaluation.per_class import (class_agnostic_ap, confusion_matrix, format_per_class_table,
                                            per_category_ap)


def cocoeval(gt: dict, results: list, iou_type: str, use_cats: bool = True) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def noisy_results(gt: dict, seed: int) -> list:
    """Jittered copies of the ground truth, some with the wrong class, plus false positives."""
    rng = np.random.default_rng(seed)
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    category_ids = [c["id"] for c in gt["categories"]]
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        height, width = sizes[ann["image_id"]]
        x, y, w, h = (v + rng.normal(0, 2) for v in ann["bbox"])
        category = ann["category_id"] if rng.random() < 0.7 else int(rng.choice(category_ids))
        results.append(box_result(ann["image_id"], category, [x, y, max(w, 1), max(h, 1)], rng.random(),
                                  height, width))
    for image_id, (height, width) in sizes.items():  # false positives
        for _ in range(2):
            x, y = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            results.append(box_result(image_id, int(rng.choice(category_ids)), [x, y, 15, 15],
                                      rng.random() * 0.8, height, width))
    return results


def box_result(image_id, category_id, box, score, height, width):
    x, y, w, h = box
    rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "score": float(score),
            "segmentation": rle}


@pytest.fixture(scope="module")
def ground_truth(tiny_shapes):
    return json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_category_ap_matches_pycocotools_precision(ground_truth, iou_type, seed):
    results = noisy_results(ground_truth, seed)
    ours = per_category_ap(ground_truth, results, iou_type)
    evaluator = cocoeval(ground_truth, results, iou_type)
    assert list(ours) == evaluator.params.catIds
    for k, category_id in enumerate(evaluator.params.catIds):
        precision = evaluator.eval["precision"][:, :, k, 0, 2]  # [T, R]: area all, 100 detections
        present = precision > -1
        expected_ap = precision[present].mean() if present.any() else -1
        assert ours[category_id]["AP"] == pytest.approx(expected_ap, abs=1e-12)
        assert ours[category_id]["AP50"] == pytest.approx(precision[0][precision[0] > -1].mean(), abs=1e-12)
        assert ours[category_id]["AP75"] == pytest.approx(precision[5][precision[5] > -1].mean(), abs=1e-12)
    # The mean over categories is COCO's AP.
    values = [v["AP"] for v in ours.values() if v["AP"] > -1]
    assert np.mean(values) == pytest.approx(evaluator.stats[0], abs=1e-12)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_class_agnostic_ap_matches_pycocotools_without_categories(ground_truth, iou_type):
    results = noisy_results(ground_truth, 2)
    agnostic = class_agnostic_ap(ground_truth, results, iou_type)
    evaluator = cocoeval(ground_truth, results, iou_type, use_cats=False)
    assert [agnostic[n] for n in ("AP", "AP50", "AP75")] == pytest.approx(evaluator.stats[:3], abs=1e-12)
    assert agnostic["AP"] > cocoeval(ground_truth, results, iou_type).stats[0]  # wrong classes cost


def square(image_id, category_id, x, y, size=10, ann_id=None, score=None, crowd=0):
    entry = {"image_id": image_id, "category_id": category_id, "bbox": [x, y, size, size]}
    if ann_id is not None:
        entry.update(id=ann_id, area=size * size, iscrowd=crowd,
                     segmentation=[[x, y, x + size, y, x + size, y + size, x, y + size]])
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects([[x, y, x + size, y, x + size, y + size, x, y + size]], 64, 64))
        rle["counts"] = rle["counts"].decode("ascii")
        entry.update(score=score, segmentation=rle)
    return entry


def test_confusion_matrix_by_hand():
    gt = {"images": [{"id": 1, "height": 64, "width": 64}, {"id": 2, "height": 64, "width": 64}],
          "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "hexagon"}],
          "annotations": [square(1, 1, 0, 0, ann_id=1), square(1, 2, 30, 30, ann_id=2),
                          square(2, 2, 0, 0, ann_id=3), square(2, 1, 40, 40, ann_id=4),
                          square(2, 1, 20, 0, size=20, ann_id=5, crowd=1)]}
    results = [square(1, 1, 0, 0, score=0.9),    # circle found as circle
               square(1, 1, 31, 30, score=0.8),  # hexagon taken for a circle
               square(1, 2, 31, 31, score=0.7),  # a second detection of it: background (already taken)
               square(2, 2, 1, 0, score=0.9),    # hexagon found
               square(2, 1, 50, 10, score=0.95),  # nothing there: background
               square(2, 1, 22, 2, score=0.9),   # inside the crowd: counts nowhere
               square(2, 2, 40, 40, score=0.3)]  # below the score threshold: the circle is missed
    matrix, category_ids = confusion_matrix(gt, results, "segm")
    assert category_ids == [1, 2]
    #                     circle hexagon missed
    expected = np.array([[1, 0, 1],    # true circle
                         [1, 1, 0],    # true hexagon
                         [1, 1, 0]])   # background
    np.testing.assert_array_equal(matrix, expected)
    matrix_all, _ = confusion_matrix(gt, results, "segm", score_thresh=0.0)
    assert matrix_all[0, 1] == 1 and matrix_all[0, 2] == 0  # the low-score hexagon on the circle


def test_confusion_matrix_agrees_with_pycocotools_matching(ground_truth):
    """Matched pairs at IoU 0.5 regardless of class = pycocotools' useCats=0 true positives."""
    results = noisy_results(ground_truth, 3)
    matrix, _ = confusion_matrix(ground_truth, results, "bbox", score_thresh=0.0)
    evaluator = cocoeval(ground_truth, results, "bbox", use_cats=False)
    num_images = len(evaluator.params.imgIds)
    true_positives = 0
    for entry in evaluator.evalImgs[:num_images]:  # ordered category, area, image: area "all" first
        if entry is None:
            continue
        matched = (entry["dtMatches"][0] > 0) & ~entry["dtIgnore"][0].astype(bool)
        true_positives += int(matched.sum())
    assert matrix[:-1, :-1].sum() == true_positives
    num_regular = sum(1 for a in ground_truth["annotations"] if not a.get("iscrowd", 0))
    assert matrix[:-1].sum() == num_regular  # every object is matched once or missed


def test_table_names_classes():
    per_class = {"segm": {1: {"AP": 0.5, "AP50": 0.75, "AP75": 0.25}, 2: {"AP": -1, "AP50": -1, "AP75": -1}}}
    table = format_per_class_table(per_class, {"segm": {"AP": 0.6, "AP50": 0.8, "AP75": 0.4}},
                                   {"segm": {"AP": 0.5, "AP50": 0.75, "AP75": 0.25}}, {1: "circle", 2: "hexagon"})
    lines = table.splitlines()
    assert lines[2].split() == ["circle", "50.0", "75.0", "25.0"]
    assert lines[3].split() == ["hexagon", "-", "-", "-"]
    assert lines[-1].split() == ["class-agnostic", "60.0", "80.0", "40.0"]
