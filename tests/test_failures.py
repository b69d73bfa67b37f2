"""evaluation.failures: hand-built cases whose outcomes are known, and pycocotools' own matching."""

import contextlib
import copy
import io
import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from minimrcnn.evaluation.failures import (DETECTION_OUTCOMES, OBJECT_OUTCOMES, classify_failures,  # noqa: E402
                                           count_outcomes)
from minimrcnn.viz import FAILURE_COLOURS, draw_failures  # noqa: E402

SQUARE, CIRCLE = 1, 2


def ground_truth_of(boxes_and_classes, crowd=()):
    """One 100 x 100 image; boxes [x, y, w, h]; ``crowd``: (box, class) crowd regions."""
    annotations = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
                    "iscrowd": 0} for i, (b, c) in enumerate(boxes_and_classes)]
    annotations += [{"id": 100 + i, "image_id": 1, "category_id": c, "bbox": list(b), "area": b[2] * b[3],
                     "iscrowd": 1} for i, (b, c) in enumerate(crowd)]
    return {"images": [{"id": 1, "height": 100, "width": 100}], "annotations": annotations,
            "categories": [{"id": SQUARE, "name": "square"}, {"id": CIRCLE, "name": "circle"}]}


def detection(box, category_id, score):
    return {"image_id": 1, "category_id": category_id, "bbox": list(box), "score": score}


@pytest.fixture
def scene():
    """Each object and detection built for one outcome (IoUs computed by hand, in the comments)."""
    gt = ground_truth_of([
        ([10, 10, 20, 20], SQUARE),  # 0: found exactly -> good
        ([50, 10, 20, 20], SQUARE),  # 1: found 4 px off: IoU 320 / 480 = 0.667 -> poor_localization
        ([10, 50, 20, 20], CIRCLE),  # 2: only a square on it -> wrong_class
        ([50, 50, 20, 20], CIRCLE),  # 3: only a circle 12 px off: IoU 160 / 640 = 0.25 -> missed
    ], crowd=[([0, 80, 40, 20], SQUARE)])
    results = [
        detection([10, 10, 20, 20], SQUARE, 0.9),  # correct (object 0)
        detection([54, 10, 20, 20], SQUARE, 0.8),  # correct (object 1), IoU 0.667
        detection([10, 50, 20, 20], SQUARE, 0.7),  # wrong_class (object 2), IoU 1
        detection([62, 50, 20, 20], CIRCLE, 0.65),  # mislocalized (object 3), IoU 0.25
        detection([11, 10, 20, 20], SQUARE, 0.6),  # duplicate of object 0: IoU 380 / 420 = 0.905
        detection([85, 5, 10, 10], CIRCLE, 0.55),  # background: overlaps nothing
        detection([5, 85, 10, 10], SQUARE, 0.95),  # inside the square crowd: ignored
        detection([30, 30, 5, 5], SQUARE, 0.3),  # below the score threshold: not counted
    ]
    return gt, results


def test_each_outcome_by_hand(scene):
    gt, results = scene
    objects, detections = classify_failures(gt, results, "bbox")
    assert [o["outcome"] for o in objects] == ["good", "poor_localization", "wrong_class", "missed"]
    assert [o["annotation_id"] for o in objects] == [1, 2, 3, 4]  # crowds are never objects
    assert [o["iou"] for o in objects] == pytest.approx([1.0, 320 / 480, 1.0, 160 / 640])
    # Highest score first; the crowd's detection and the one below 0.5 are not there.
    assert [d["result_index"] for d in detections] == [0, 1, 2, 3, 4, 5]
    assert [d["outcome"] for d in detections] == ["correct", "correct", "wrong_class", "mislocalized",
                                                  "duplicate", "background"]
    assert [d["iou"] for d in detections] == pytest.approx([1.0, 320 / 480, 1.0, 160 / 640, 380 / 420, 0.0])
    assert detections[0]["bbox"] == [10, 10, 20, 20] and detections[0]["score"] == 0.9
    assert count_outcomes(objects, OBJECT_OUTCOMES) == {"good": 1, "poor_localization": 1, "wrong_class": 1,
                                                        "missed": 1}
    assert count_outcomes(detections, DETECTION_OUTCOMES, by="category_id") == {
        SQUARE: {"correct": 2, "duplicate": 1, "wrong_class": 1, "mislocalized": 0, "background": 0},
        CIRCLE: {"correct": 0, "duplicate": 0, "wrong_class": 0, "mislocalized": 1, "background": 1}}


def test_thresholds_move_the_boundaries(scene):
    gt, results = scene
    objects, detections = classify_failures(gt, results, "bbox", good_iou=0.6, background_iou=0.3,
                                            score_thresh=0.62)
    assert [o["outcome"] for o in objects] == ["good", "good", "wrong_class", "missed"]
    # The circle 0.25 off its object is now background; the duplicate (0.6) and the far circle are dropped.
    assert [d["outcome"] for d in detections] == ["correct", "correct", "wrong_class", "background"]
    with pytest.raises(ValueError, match="background_iou"):
        classify_failures(gt, results, "bbox", background_iou=0.6)


def test_the_better_detection_takes_the_object_and_wrong_class_needs_no_match():
    gt = ground_truth_of([([10, 10, 20, 20], SQUARE)])
    # The lower-scoring square fits better, but the higher one takes the object first (greedy, as COCO);
    # the circle on it is a classification error even though the object is found.
    results = [detection([12, 10, 20, 20], SQUARE, 0.9), detection([10, 10, 20, 20], SQUARE, 0.8),
               detection([10, 10, 20, 20], CIRCLE, 0.7)]
    objects, detections = classify_failures(gt, results, "bbox")
    assert [o["outcome"] for o in objects] == ["good"] and objects[0]["iou"] == pytest.approx(360 / 440)
    assert [d["outcome"] for d in detections] == ["correct", "duplicate", "wrong_class"]


def test_empty_inputs():
    gt = ground_truth_of([([10, 10, 20, 20], CIRCLE)])
    objects, detections = classify_failures(gt, [], "bbox")
    assert [(o["outcome"], o["iou"]) for o in objects] == [("missed", 0.0)] and detections == []
    objects, detections = classify_failures(ground_truth_of([]), [detection([1, 1, 5, 5], SQUARE, 0.9)], "bbox")
    assert objects == [] and [d["outcome"] for d in detections] == ["background"]
    with pytest.raises(ValueError, match="image_id 7"):
        classify_failures(gt, [{**detection([1, 1, 5, 5], SQUARE, 0.9), "image_id": 7}], "bbox")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_correct_detections_are_cocos_true_positives_at_iou_half(tiny_shapes, iou_type):
    from test_per_class import noisy_results

    gt = json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())
    results = noisy_results(gt, seed=3)
    objects, detections = classify_failures(gt, results, iou_type)
    kept = [r for r in results if r["score"] >= 0.5]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(kept)), iou_type)
        evaluator.evaluate()
    true_positives = found = 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != evaluator.params.areaRng[0]:
            continue
        matched = entry["dtMatches"][0] > 0  # IoU 0.5
        true_positives += int((matched & ~entry["dtIgnore"][0].astype(bool)).sum())
        found += int(((entry["gtMatches"][0] > 0) & ~np.asarray(entry["gtIgnore"], dtype=bool)).sum())
    outcomes = count_outcomes(detections, DETECTION_OUTCOMES)
    assert outcomes["correct"] == true_positives > 0
    assert count_outcomes(objects, OBJECT_OUTCOMES)["good"] + count_outcomes(objects, OBJECT_OUTCOMES)[
        "poor_localization"] == found
    assert len(objects) == sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert sum(outcomes.values()) <= len(kept)  # the detections on crowds are left out
    assert all(o["iou"] >= 0.75 for o in objects if o["outcome"] == "good")


def test_draw_failures(scene):
    gt, results = scene
    objects, detections = classify_failures(gt, results, "bbox")
    figure, ax = plt.subplots()
    artists = draw_failures(ax, np.zeros((100, 100, 3)), objects, detections, {SQUARE: "square", CIRCLE: "circle"})
    assert len(ax.patches) == len(objects) + len(detections)
    dashed = [p for p in ax.patches if p.get_linestyle() == "--"]
    assert len(dashed) == len(objects)
    assert dashed[3].get_edgecolor()[:3] == pytest.approx(matplotlib.colors.to_rgb(FAILURE_COLOURS["missed"]))
    texts = [t.get_text() for t in ax.texts]
    assert "circle: missed" in texts and "square: duplicate" in texts and not any("good" in t for t in texts)
    legend = [t.get_text() for t in artists[-1].get_texts()]
    assert "detection correct: 2" in legend and "object missed: 1" in legend
    with pytest.raises(ValueError, match="outcome"):
        draw_failures(ax, np.zeros((4, 4, 3)), [{**objects[0], "outcome": "lost"}], [])
    plt.close(figure)
