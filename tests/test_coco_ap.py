"""Our readable COCO AP against pycocotools' COCOeval, the judge, on synthetic data."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from minimrcnn.evaluation.coco_ap import (
    RECALL_THRESHOLDS,
    coco_ap,
    evaluate,
    interpolate_precision,
    match_detections,
    precision_recall,
    raw_precision_recall,
)

NUM_CATEGORIES = 4
# Image sizes (h, w): big enough for objects in all three COCO size ranges.
IMAGE_SIZES = [(160, 200), (64, 64), (240, 320), (100, 150), (128, 128), (90, 60)]


# ----------------------------------------------------------------------------- reference

def pycocotools_stats(gt: dict, results: list, iou_type: str) -> np.ndarray:
    """The twelve numbers of pycocotools' summary (it mutates its inputs: give copies)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list; an empty result set is still valid
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats)


def assert_matches_pycocotools(gt, results, iou_type):
    expected = pycocotools_stats(gt, results, iou_type)
    actual = coco_ap(copy.deepcopy(gt), copy.deepcopy(results), iou_type)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    return actual


# ------------------------------------------------------------------------ synthetic data

def rasterize(shape: dict, height: int, width: int) -> np.ndarray:
    """An ellipse or a rectangle given by centre and half-sizes -> uint8 mask [H, W]."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    dy, dx = (ys - shape["cy"]) / shape["ry"], (xs - shape["cx"]) / shape["rx"]
    if shape["kind"] == "ellipse":
        inside = dx**2 + dy**2 <= 1
    else:
        inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    return inside.astype(np.uint8)


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Run lengths of the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def decode_segmentation(segmentation, height, width) -> np.ndarray:
    if isinstance(segmentation, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
    if isinstance(segmentation["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    return mask_utils.decode(segmentation)


def mask_box(mask: np.ndarray) -> list:
    return mask_utils.toBbox(compressed_rle(mask)).tolist()


def random_shape(rng, height, width):
    half = rng.choice([rng.uniform(2, 10), rng.uniform(10, 35), rng.uniform(35, 80)])
    return {"kind": rng.choice(["ellipse", "rectangle"]),
            "cx": rng.uniform(0, width), "cy": rng.uniform(0, height),
            "rx": max(1.5, half * rng.uniform(0.6, 1.4)), "ry": max(1.5, half * rng.uniform(0.6, 1.4))}


def make_ground_truth(rng, with_empty_category=True):
    """Images with 0-7 objects of 4 categories, a few crowd regions, several encodings."""
    images, annotations, shapes = [], [], {}
    for image_id, (height, width) in enumerate(IMAGE_SIZES, start=1):
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.png"})
        num_objects = 0 if image_id == 2 else int(rng.integers(1, 8))
        for _ in range(num_objects):
            shape = random_shape(rng, height, width)
            mask = rasterize(shape, height, width)
            if mask.sum() == 0:
                continue
            crowd = int(rng.random() < 0.12)
            encoding = rng.integers(3)
            if crowd or encoding == 0:
                segmentation = uncompressed_rle(mask)
            elif encoding == 1 and shape["kind"] == "rectangle":
                x, y, w, h = mask_box(mask)
                segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
            else:
                segmentation = compressed_rle(mask)
            annotation_id = len(annotations) + 1
            annotations.append({
                "id": annotation_id, "image_id": image_id,
                "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)),
                "segmentation": segmentation, "bbox": mask_box(mask),
                # The JSON area decides the size range; sometimes it is not the mask's.
                "area": float(mask.sum()) if rng.random() < 0.8 else float(rng.uniform(10, 12000)),
                "iscrowd": crowd,
            })
            shapes[annotation_id] = shape
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"}
                  for c in range(1, NUM_CATEGORIES + 1 + int(with_empty_category))]
    return {"images": images, "annotations": annotations, "categories": categories}, shapes


def make_detection(rng, image, category_id, shape, score, jitter):
    height, width = image["height"], image["width"]
    shape = dict(shape)
    for key in ("cx", "cy"):
        shape[key] += rng.normal(0, jitter)
    for key in ("rx", "ry"):
        shape[key] = max(1.0, shape[key] * (1 + rng.normal(0, 0.1 * jitter)))
    mask = rasterize(shape, height, width)
    box = [float(shape["cx"] - shape["rx"]), float(shape["cy"] - shape["ry"]),
           float(2 * shape["rx"]), float(2 * shape["ry"])]
    return {"image_id": image["id"], "category_id": category_id, "score": score,
            "bbox": box, "segmentation": compressed_rle(mask)}


def perturbed_detections(rng, gt, shapes):
    """Jittered copies (some missing, some duplicated), false positives, tied scores."""
    images = {image["id"]: image for image in gt["images"]}
    results = []

    def score():  # one decimal: many exact ties
        return float(np.round(rng.uniform(0.05, 1.0), 1))

    for annotation in gt["annotations"]:
        image = images[annotation["image_id"]]
        shape = shapes[annotation["id"]]
        copies = 0 if rng.random() < 0.2 else (2 if rng.random() < 0.2 else 1)
        if annotation["iscrowd"]:
            copies = int(rng.integers(0, 4))  # a crowd absorbs several detections
        for _ in range(copies):
            label = annotation["category_id"] if rng.random() < 0.9 else int(rng.integers(1, NUM_CATEGORIES + 1))
            results.append(make_detection(rng, image, label, shape, score(), rng.uniform(0, 4)))
    for image in gt["images"]:
        for _ in range(int(rng.integers(0, 5))):
            shape = random_shape(rng, image["height"], image["width"])
            label = int(rng.integers(1, NUM_CATEGORIES + 2))  # category 5 has no ground truth
            results.append(make_detection(rng, image, label, shape, score(), 0))
    order = rng.permutation(len(results))
    return [results[i] for i in order]


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perturbed_detections_match_pycocotools(seed, iou_type):
    rng = np.random.default_rng(seed)
    gt, shapes = make_ground_truth(rng)
    results = perturbed_detections(rng, gt, shapes)
    stats = assert_matches_pycocotools(gt, results, iou_type)
    assert 0 < stats[0] < 1  # a non-trivial case


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_results_with_only_a_box_or_only_a_mask(iou_type):
    rng = np.random.default_rng(11)
    gt, shapes = make_ground_truth(rng)
    results = perturbed_detections(rng, gt, shapes)
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]  # area from mask
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]  # mask = box
    assert_matches_pycocotools(gt, masks_only, iou_type)
    assert_matches_pycocotools(gt, boxes_only, iou_type)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_score_one(iou_type):
    gt, _ = make_ground_truth(np.random.default_rng(3), with_empty_category=False)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                "bbox": a["bbox"], "segmentation": a["segmentation"]}
               for a in gt["annotations"] if not a["iscrowd"]]
    for result in results:  # results carry compressed RLE and the mask's box
        image = gt["images"][result["image_id"] - 1]
        mask = decode_segmentation(result["segmentation"], image["height"], image["width"])
        result["segmentation"] = compressed_rle(mask)
        result["bbox"] = mask_box(mask)
    stats = assert_matches_pycocotools(gt, results, iou_type)
    assert stats[0] == pytest.approx(1.0)
    assert stats[1] == pytest.approx(1.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_detections(iou_type):
    gt, _ = make_ground_truth(np.random.default_rng(4))
    stats = assert_matches_pycocotools(gt, [], iou_type)
    assert stats[0] == 0 and stats[8] == 0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_detections_only_in_a_category_without_ground_truth(iou_type):
    rng = np.random.default_rng(5)
    gt, shapes = make_ground_truth(rng)
    results = [r for r in perturbed_detections(rng, gt, shapes) if r["category_id"] == 5]
    results.append(make_detection(rng, gt["images"][0], 5, random_shape(rng, 160, 200), 0.5, 0))
    stats = assert_matches_pycocotools(gt, results, iou_type)
    assert stats[0] == 0  # categories with ground truth get nothing; category 5 is absent


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_more_than_100_detections_per_image(iou_type):
    rng = np.random.default_rng(6)
    gt, shapes = make_ground_truth(rng)
    results = perturbed_detections(rng, gt, shapes)
    image = gt["images"][2]
    first = next(a for a in gt["annotations"] if a["image_id"] == image["id"])
    for _ in range(150):  # one (image, category) with 150 detections, and good ones low
        results.append(make_detection(rng, image, first["category_id"], shapes[first["id"]],
                                      float(rng.uniform(0, 1)), rng.uniform(0, 12)))
    assert_matches_pycocotools(gt, results, iou_type)


def test_ground_truth_and_results_from_files(tmp_path):
    rng = np.random.default_rng(7)
    gt, shapes = make_ground_truth(rng)
    results = perturbed_detections(rng, gt, shapes)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    from_files = coco_ap(str(tmp_path / "gt.json"), tmp_path / "results.json", "segm")
    np.testing.assert_allclose(from_files, pycocotools_stats(gt, results, "segm"), rtol=0, atol=1e-6)


# --------------------------------------------------------------- hand-computed cases

def tiny_ground_truth():
    return {"images": [{"id": 1, "height": 100, "width": 100}],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40],
                             "segmentation": [[10, 10, 50, 10, 50, 50, 10, 50]],
                             "area": 1600.0, "iscrowd": 0}]}


def test_false_positive_ranked_first_halves_precision():
    results = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [60, 60, 30, 30]},
               {"image_id": 1, "category_id": 1, "score": 0.8, "bbox": [10, 10, 40, 40]}]
    stats = coco_ap(tiny_ground_truth(), results, "bbox")
    # recall reaches 1 at the second detection, where precision is 1/2, at every threshold
    assert stats[0] == pytest.approx(0.5)
    assert stats[6] == 0  # AR1: the single allowed detection is the false positive
    assert stats[7] == pytest.approx(1.0)
    # APm: the 30x30 false positive is small, so the medium range ignores it
    assert stats[4] == pytest.approx(1.0) and stats[3] == -1 and stats[5] == -1


def test_match_detections_prefers_regular_objects_and_lets_crowds_absorb():
    # 3 detections, ground truth: regular object, crowd (ignored, last)
    ious = np.array([[0.6, 0.9], [0.7, 0.8], [0.2, 0.95]])
    gt_ignored = np.array([False, True])
    gt_crowd = np.array([False, True])
    matched = match_detections(ious, gt_ignored, gt_crowd, 0.5)
    # first takes the regular object although the crowd overlaps more; the others
    # fall back to the crowd, which absorbs both
    np.testing.assert_array_equal(matched, [0, 1, 1])
    np.testing.assert_array_equal(match_detections(ious, gt_ignored, gt_crowd, 0.75), [1, 1, 1])


def test_interpolation_takes_the_best_precision_to_the_right():
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    sampled = interpolate_precision(recall, precision)
    assert np.all(sampled[RECALL_THRESHOLDS <= 0.5] == 1.0)
    assert np.allclose(sampled[RECALL_THRESHOLDS > 0.5], 2 / 3)


def test_precision_recall_curves_average_to_ap50():
    rng = np.random.default_rng(8)
    gt, shapes = make_ground_truth(rng)
    evaluation = evaluate(gt, perturbed_detections(rng, gt, shapes), "segm")
    recall_points, mean_curve = precision_recall(evaluation, iou_threshold=0.5)
    assert recall_points.shape == mean_curve.shape == (101,)
    assert mean_curve.mean() == pytest.approx(evaluation.stats[1])
    assert np.all(np.diff(mean_curve) <= 1e-12)  # interpolated curves never rise
    category = evaluation.category_ids[0]
    _, curve = precision_recall(evaluation, 0.5, category_id=category)
    recall, precision = raw_precision_recall(evaluation, category, 0.5)
    assert recall.shape == precision.shape and np.all(np.diff(recall) >= 0)
    assert curve[0] == pytest.approx(precision.max())


# ---------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_culprit():
    gt = tiny_ground_truth()
    good = [{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(ValueError, match="iou_type"):
        coco_ap(gt, good, "keypoints")
    with pytest.raises(ValueError, match="image_id 7"):
        coco_ap(gt, [dict(good[0], image_id=7)], "bbox")
    with pytest.raises(ValueError, match="'annotations'"):
        coco_ap({"images": [], "categories": []}, good, "bbox")
    with pytest.raises(ValueError, match="annotation ids"):
        coco_ap(dict(gt, annotations=[dict(gt["annotations"][0], id=0)]), good, "bbox")
    with pytest.raises(TypeError, match="results"):
        coco_ap(gt, {"image_id": 1}, "bbox")
    with pytest.raises(ValueError, match="missing.json"):
        coco_ap("missing.json", good, "bbox")
    with pytest.raises(ValueError, match=r"results\[0\]"):
        coco_ap(gt, [{"image_id": 1, "category_id": 1, "score": 0.5}], "segm")
    with pytest.raises(ValueError, match="annotation 1 has no 'segmentation'"):
        coco_ap(dict(gt, annotations=[{k: v for k, v in gt["annotations"][0].items()
                                       if k != "segmentation"}]), good, "segm")
    with pytest.raises(ValueError, match="iou_threshold"):
        precision_recall(evaluate(gt, good, "bbox"), iou_threshold=0.52)


# ------------------------------------------------------------------------ shapes set

@pytest.mark.parametrize("seed", [0, 1])
def test_shapes_ground_truth_with_perturbed_detections(tiny_shapes, seed):
    """Detections made from the shapes annotations: shifted masks, jittered boxes, extras."""
    gt = json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())
    assert any(a["iscrowd"] for a in gt["annotations"])  # the crowd path is exercised
    rng = np.random.default_rng(seed)
    images = {image["id"]: image for image in gt["images"]}
    category_ids = [c["id"] for c in gt["categories"]]
    results = []
    for annotation in gt["annotations"]:
        image = images[annotation["image_id"]]
        mask = decode_segmentation(annotation["segmentation"], image["height"], image["width"])
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
            shift = rng.integers(-3, 4, size=2)
            moved = np.roll(mask, tuple(shift), axis=(0, 1))
            box = np.asarray(annotation["bbox"], dtype=float) + rng.normal(0, 1.5, 4)
            results.append({"image_id": image["id"], "category_id": annotation["category_id"],
                            "score": float(np.round(rng.uniform(0.1, 1), 2)),
                            "bbox": box.tolist(), "segmentation": compressed_rle(moved)})
    for image in gt["images"]:  # false positives, some in categories that may lack ground truth
        for _ in range(3):
            shape = random_shape(rng, image["height"], image["width"])
            results.append(make_detection(rng, image, int(rng.choice(category_ids)), shape,
                                          float(np.round(rng.uniform(0, 1), 2)), 0))
    for iou_type in ("bbox", "segm"):
        stats = assert_matches_pycocotools(gt, results, iou_type)
        assert 0 < stats[0] < 1
