"""Panoptic Quality: hand-built cases with known answers, error messages, and an independent
brute-force transcription of the COCO panoptic API's ``pq_compute`` on random inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from minimrcnn.evaluation import format_pq_table, panoptic_quality
from minimrcnn.evaluation.panoptic import is_ignored_prediction, is_match, matched_iou, pq_stats_per_image

# categories: two things, two stuff
CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 3, "name": "sky", "isthing": 0}, {"id": 4, "name": "ground", "isthing": 0}]


def _rgb(ids):
    ids = np.asarray(ids, dtype=np.int64)  # written here without the package's codec
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _segments(ids, category, crowd=(), json_area=None):
    """segments_info for a map: {segment id: category id}; areas measured unless overridden."""
    return [{"id": s, "category_id": c, "area": int((np.asarray(ids) == s).sum()) if json_area is None
             or s not in json_area else json_area[s], "bbox": [0, 0, 0, 0], "iscrowd": int(s in crowd)}
            for s, c in category.items()]


def write_case(root, images, categories=CATEGORIES):
    """images: list of (gt_ids, gt_segments, pred_ids, pred_segments). Returns pq_compute's 4 arguments."""
    for side in ("gt", "pred"):
        (root / side).mkdir(parents=True, exist_ok=True)
    content = {"gt": [], "pred": []}
    for image_id, (gt_ids, gt_segments, pred_ids, pred_segments) in enumerate(images, start=1):
        for side, ids, segments in (("gt", gt_ids, gt_segments), ("pred", pred_ids, pred_segments)):
            name = f"{side}_{image_id}.png"
            Image.fromarray(_rgb(ids)).save(root / side / name)
            content[side].append({"image_id": image_id, "file_name": name, "segments_info": segments})
    for side in ("gt", "pred"):
        (root / f"{side}.json").write_text(json.dumps({"annotations": content[side], "categories": categories}))
    return root / "gt.json", root / "pred.json", root / "gt", root / "pred"


def evaluate(root, images, categories=CATEGORIES):
    return panoptic_quality(*write_case(root, images, categories))


def counts(result, category_id):
    r = result["per_class"][category_id]
    return r["tp"], r["fp"], r["fn"]


# a 4 x 6 scene: sky on top, ground below, thing 1 (id 7) and thing 2 (id 9) on the ground
SCENE = np.array([[3, 3, 3, 3, 3, 3],
                  [3, 3, 3, 3, 3, 3],
                  [4, 7, 7, 4, 9, 9],
                  [4, 7, 7, 4, 9, 9]])
SCENE_CATEGORY = {3: 3, 4: 4, 7: 1, 9: 2}


def test_match_rule_helpers():
    assert matched_iou(3, 4, 5, 0) == 3 / 6
    assert matched_iou(4, 8, 4, 4) == 1.0  # the prediction's 4 void pixels leave the union
    assert is_match(0.5 + 1e-12) and not is_match(0.5)
    assert not is_ignored_prediction(4, 1, 1) and is_ignored_prediction(4, 2, 1)


def test_perfect_prediction_is_one_with_other_ids(tmp_path):
    pred = SCENE * 1000 + 5  # other segment ids, the same segments
    result = evaluate(tmp_path, [(SCENE, _segments(SCENE, SCENE_CATEGORY), pred,
                                  _segments(pred, {k * 1000 + 5: v for k, v in SCENE_CATEGORY.items()}))])
    for group, n in (("All", 4), ("Things", 2), ("Stuff", 2)):
        assert result[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert all(counts(result, c) == (1, 0, 0) for c in (1, 2, 3, 4))


def test_missed_segment_is_a_false_negative(tmp_path):
    pred = np.where(SCENE == 9, 0, SCENE)  # thing 2 not predicted: void there
    category = {k: v for k, v in SCENE_CATEGORY.items() if k != 9}
    result = evaluate(tmp_path, [(SCENE, _segments(SCENE, SCENE_CATEGORY), pred, _segments(pred, category))])
    assert counts(result, 2) == (0, 0, 1)
    assert result["per_class"][2]["pq"] == 0.0
    assert result["Things"] == {"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2}
    assert result["All"]["pq"] == 0.75 and result["Stuff"]["pq"] == 1.0


def test_split_segment(tmp_path):
    gt = np.array([[1] * 5 + [2] * 5])  # thing segment 1 (5 px) beside ground 2
    pred = np.array([[5, 5, 5, 5, 6, 8, 8, 8, 8, 8]])  # the thing split 4 + 1; ground exact
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 6: 1, 8: 4}))])
    # 5: IoU 4/5 -> TP; 6: IoU 1/5 -> unmatched, not on void -> FP
    assert counts(result, 1) == (1, 1, 0)
    assert result["per_class"][1]["sq"] == pytest.approx(0.8)
    assert result["per_class"][1]["rq"] == pytest.approx(1 / 1.5)
    assert result["per_class"][1]["pq"] == pytest.approx(0.8 / 1.5)
    # split in halves, each at IoU 3/6 = 0.5: one FN and two FPs
    gt = np.array([[1] * 6 + [2] * 4])
    pred = np.array([[5, 5, 5, 6, 6, 6, 8, 8, 8, 8]])
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 6: 1, 8: 4}))])
    assert counts(result, 1) == (0, 2, 1) and result["per_class"][1]["pq"] == 0.0


def test_iou_exactly_half_is_not_a_match(tmp_path):
    gt = np.array([[1, 1, 1, 1, 2, 2]])
    pred = np.array([[5, 5, 8, 8, 8, 8]])  # 5 covers half of segment 1: IoU 2/4 = 0.5
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 8: 4}))])
    assert counts(result, 1) == (0, 1, 1)
    gt = np.array([[1, 1, 1, 1, 1, 2]])
    pred = np.array([[5, 5, 5, 8, 8, 8]])  # IoU 3/5 = 0.6: a match
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 8: 4}))])
    assert counts(result, 1) == (1, 0, 0) and result["per_class"][1]["sq"] == pytest.approx(0.6)


def test_void_pixels_leave_the_union(tmp_path):
    gt = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]])  # 4 void pixels, thing 1 (4 px)
    pred = np.array([[5, 5, 5, 5, 5, 5, 5, 5, 8, 8]])  # 5 covers the void and the thing
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 8: 4}))])
    assert counts(result, 1) == (1, 0, 0)  # IoU 4 / (8 + 4 - 4 - 4) = 1, not 4 / 8
    assert result["per_class"][1]["sq"] == 1.0


def test_predictions_on_void(tmp_path):
    gt = np.array([[0, 0, 0, 0, 2, 2, 2, 2]])
    pred = np.array([[5, 5, 5, 6, 6, 8, 8, 8]])  # 5: all void -> ignored; 6: half void -> FP
    result = evaluate(tmp_path, [(gt, _segments(gt, {2: 4}), pred, _segments(pred, {5: 1, 6: 2, 8: 4}))])
    assert counts(result, 1) == (0, 0, 0) and counts(result, 2) == (0, 1, 0)
    assert counts(result, 4) == (1, 0, 0)  # ground: IoU 3/4
    assert result["Things"]["n"] == 1 and result["All"]["n"] == 2
    assert result["per_class"][4]["sq"] == pytest.approx(0.75)


def test_crowd_is_never_a_false_negative_and_excuses_its_category(tmp_path):
    gt = np.array([[1, 1, 1, 1, 1, 1, 4, 4, 4, 4]])  # 1: crowd of category 1 (6 px); 4: ground
    crowd = {1}
    cases = [  # (pred map, its categories, expected (tp, fp, fn) of categories 1 and 2)
        (np.array([[0, 0, 0, 0, 0, 0, 8, 8, 8, 8]]), {8: 4}, (0, 0, 0), (0, 0, 0)),  # crowd not predicted
        (np.array([[5, 5, 5, 5, 5, 5, 8, 8, 8, 8]]), {5: 1, 8: 4}, (0, 0, 0), (0, 0, 0)),  # exact: no match, ignored
        (np.array([[5, 5, 5, 5, 5, 5, 8, 8, 8, 8]]), {5: 2, 8: 4}, (0, 0, 0), (0, 1, 0)),  # other category: FP
        (np.array([[8, 8, 8, 5, 5, 5, 5, 8, 8, 8]]), {5: 1, 8: 4}, (0, 0, 0), (0, 0, 0)),  # 3/4 on crowd: ignored
        (np.array([[8, 8, 8, 8, 5, 5, 5, 5, 8, 8]]), {5: 1, 8: 4}, (0, 1, 0), (0, 0, 0)),  # 2/4 on crowd: FP
    ]
    for pred, category, expected_1, expected_2 in cases:
        result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 4: 4}, crowd), pred, _segments(pred, category))])
        assert (counts(result, 1), counts(result, 2)) == (expected_1, expected_2), category


def test_crowd_and_void_add_up_and_the_last_crowd_counts(tmp_path):
    gt = np.array([[0, 0, 1, 1, 2, 2, 4, 4]])  # 1 and 2: two crowd regions of category 1
    pred = np.array([[5, 5, 5, 6, 6, 6, 8, 8]])
    # 5: 2 void + 1 crowd(1) of 3 -> ignored. 6: 1 on crowd 1, 2 on crowd 2 (listed last) -> ignored
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 2: 1, 4: 4}, crowd={1, 2}), pred,
                                  _segments(pred, {5: 1, 6: 1, 8: 4}))])
    assert counts(result, 1) == (0, 0, 0)
    # listed the other way round, crowd 1 is "the" crowd: 6 has 1/3 on it -> FP (as pq_compute)
    result = evaluate(tmp_path, [(gt, _segments(gt, {2: 1, 1: 1, 4: 4}, crowd={1, 2}), pred,
                                  _segments(pred, {5: 1, 6: 1, 8: 4}))])
    assert counts(result, 1) == (0, 1, 0)


def test_stuff_absent_from_both_sides_is_left_out(tmp_path):
    gt = np.array([[1, 1, 3, 3]])  # no ground (4), no thing 2
    pred = np.array([[5, 5, 6, 6]])
    result = evaluate(tmp_path, [(gt, _segments(gt, {1: 1, 3: 3}), pred, _segments(pred, {5: 1, 6: 3}))])
    assert result["Stuff"]["n"] == 1 and result["Things"]["n"] == 1 and result["All"]["n"] == 2
    assert result["All"]["pq"] == 1.0
    assert result["per_class"][4] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
    table = format_pq_table(result, {c["id"]: c["name"] for c in CATEGORIES})
    assert "ground" in table and "Stuff" in table and "100.0" in table


def test_image_with_only_void(tmp_path):
    void = np.zeros((3, 4), dtype=np.int64)
    one = (SCENE, _segments(SCENE, SCENE_CATEGORY), SCENE, _segments(SCENE, SCENE_CATEGORY))
    with_void = evaluate(tmp_path / "a", [one, (void, [], void, [])])
    assert with_void == evaluate(tmp_path / "b", [one])
    nothing = evaluate(tmp_path / "c", [(void, [], void, [])])
    assert nothing["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    # a prediction on an all-void image is ignored, not a false positive
    pred = np.ones((3, 4), dtype=np.int64)
    assert evaluate(tmp_path / "d", [(void, [], pred, _segments(pred, {1: 2}))])["All"]["n"] == 0


def test_ground_truth_areas_come_from_the_json(tmp_path):
    gt = np.array([[1, 1, 1, 1, 2, 2]])
    pred = np.array([[5, 5, 5, 5, 8, 8]])
    exact = evaluate(tmp_path / "a", [(gt, _segments(gt, {1: 1, 2: 4}), pred, _segments(pred, {5: 1, 8: 4}))])
    assert exact["per_class"][1]["sq"] == 1.0
    # the JSON says segment 1 has 6 px: the union grows to 6 -> IoU 4/6; predicted areas stay from the PNG
    pred_segments = [{"id": 5, "category_id": 1, "area": 99}, {"id": 8, "category_id": 4}]  # 99: not read
    listed = evaluate(tmp_path / "b", [(gt, _segments(gt, {1: 1, 2: 4}, json_area={1: 6}), pred, pred_segments)])
    assert listed["per_class"][1]["sq"] == pytest.approx(4 / 6)


def test_images_are_paired_by_image_id(tmp_path):
    half = np.where(SCENE == 7, 0, SCENE)
    gt_json, pred_json, gt_folder, pred_folder = write_case(tmp_path, [
        (SCENE, _segments(SCENE, SCENE_CATEGORY), half, _segments(half, {3: 3, 4: 4, 9: 2})),
        (SCENE, _segments(SCENE, SCENE_CATEGORY), SCENE, _segments(SCENE, SCENE_CATEGORY))])
    pred = json.loads(pred_json.read_text())
    before = panoptic_quality(gt_json, pred_json, gt_folder, pred_folder)
    pred["annotations"].reverse()  # order does not matter, image ids do
    pred_json.write_text(json.dumps(pred))
    assert panoptic_quality(gt_json, pred_json, gt_folder, pred_folder) == before
    assert counts(before, 1) == (1, 0, 1)


# ---------------------------------------------------------------- errors


def _broken(tmp_path, pred_ids, pred_segments, categories=CATEGORIES):
    return write_case(tmp_path, [(SCENE, _segments(SCENE, SCENE_CATEGORY), pred_ids, pred_segments)], categories)


def test_error_png_segment_missing_from_json(tmp_path):
    args = _broken(tmp_path, SCENE, _segments(SCENE, {3: 3, 4: 4, 7: 1}))
    with pytest.raises(KeyError, match=r"pred_1\.png.*segment id 9 is in the PNG but not in the JSON"):
        panoptic_quality(*args)


def test_error_json_segment_missing_from_png(tmp_path):
    args = _broken(tmp_path, SCENE, _segments(SCENE, SCENE_CATEGORY) + [{"id": 11, "category_id": 1}])
    with pytest.raises(KeyError, match=r"pred_1\.png.*segment ids \[11\] are in the JSON .* not in the PNG"):
        panoptic_quality(*args)


def test_error_unknown_category(tmp_path):
    args = _broken(tmp_path, SCENE, _segments(SCENE, {**SCENE_CATEGORY, 9: 42}))
    with pytest.raises(KeyError, match=r"pred_1\.png.*segment id 9 has unknown category_id 42"):
        panoptic_quality(*args)
    args = write_case(tmp_path / "gt", [(SCENE, _segments(SCENE, {**SCENE_CATEGORY, 9: 42}),
                                         SCENE, _segments(SCENE, SCENE_CATEGORY))])
    with pytest.raises(KeyError, match=r"gt\.json.*segment id 9 has unknown category_id 42"):
        panoptic_quality(*args)


def test_error_image_without_prediction(tmp_path):
    gt_json, pred_json, gt_folder, pred_folder = _broken(tmp_path, SCENE, _segments(SCENE, SCENE_CATEGORY))
    pred = json.loads(pred_json.read_text())
    pred["annotations"][0]["image_id"] = 5
    pred_json.write_text(json.dumps(pred))
    with pytest.raises(KeyError, match=r"pred\.json.*no prediction for the image with id 1"):
        panoptic_quality(gt_json, pred_json, gt_folder, pred_folder)


def test_error_files_and_shapes(tmp_path):
    narrow = SCENE[:, :4]
    gt_json, pred_json, gt_folder, pred_folder = _broken(tmp_path, narrow, _segments(narrow, {3: 3, 4: 4, 7: 1}))
    with pytest.raises(ValueError, match=r"pred_1\.png.*\[4, 4\].*\[4, 6\]"):
        panoptic_quality(gt_json, pred_json, gt_folder, pred_folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        panoptic_quality(gt_json, pred_json, gt_folder, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        panoptic_quality(gt_json, tmp_path / "missing.json", gt_folder, pred_folder)
    (pred_folder / "pred_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"pred_1\.png"):
        panoptic_quality(gt_json, pred_json, gt_folder, pred_folder)


# ---------------------------------------------------------------- independent reference


def reference_pq(gt_json, pred_json, gt_folder, pred_folder):
    """The COCO panoptic API's pq_compute transcribed step by step (float64, np.unique on
    gt * 2^24 + pred, PNGs read with PIL as uint32), for comparison on random inputs."""
    offset = 256 ** 3
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    stat = {c: np.zeros(4) for c in categories}  # tp, fp, fn, iou

    def load(path):
        rgb = np.array(Image.open(path), dtype=np.uint32)
        return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]

    for gt_ann in gt["annotations"]:
        pred_ann = preds[gt_ann["image_id"]]
        pan_gt, pan_pred = load(gt_folder / gt_ann["file_name"]), load(pred_folder / pred_ann["file_name"])
        gt_segms = {s["id"]: dict(s) for s in gt_ann["segments_info"]}
        pred_segms = {s["id"]: dict(s) for s in pred_ann["segments_info"]}
        for label, count in zip(*np.unique(pan_pred, return_counts=True)):
            if label != 0:
                pred_segms[label]["area"] = count
        pairs = pan_gt.astype(np.uint64) * offset + pan_pred.astype(np.uint64)
        gt_pred = {(int(l // offset), int(l % offset)): c for l, c in zip(*np.unique(pairs, return_counts=True))}
        gt_matched, pred_matched = set(), set()
        for (g, p), inter in gt_pred.items():
            if g not in gt_segms or p not in pred_segms or gt_segms[g]["iscrowd"] == 1:
                continue
            if gt_segms[g]["category_id"] != pred_segms[p]["category_id"]:
                continue
            union = pred_segms[p]["area"] + gt_segms[g]["area"] - inter - gt_pred.get((0, p), 0)
            if inter / union > 0.5:
                stat[gt_segms[g]["category_id"]] += [1, 0, 0, inter / union]
                gt_matched.add(g)
                pred_matched.add(p)
        crowd = {}
        for g, info in gt_segms.items():
            if g in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd[info["category_id"]] = g
                continue
            stat[info["category_id"]][2] += 1
        for p, info in pred_segms.items():
            if p in pred_matched:
                continue
            inter = gt_pred.get((0, p), 0)
            if info["category_id"] in crowd:
                inter += gt_pred.get((crowd[info["category_id"]], p), 0)
            if inter / info["area"] <= 0.5:
                stat[info["category_id"]][1] += 1
    result = {}
    for name, isthing in (("All", None), ("Things", 1), ("Stuff", 0)):
        values = []
        for c, (tp, fp, fn, iou) in stat.items():
            if (isthing is None or categories[c]["isthing"] == isthing) and tp + fp + fn > 0:
                values.append((iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0, tp / (tp + fp / 2 + fn / 2)))
        result[name] = list(np.mean(values, axis=0)) + [len(values)] if values else [0.0, 0.0, 0.0, 0]
    result["per_class"] = {c: tuple(int(v) for v in s[:3]) for c, s in stat.items()}
    return result


def random_image(rng, size=20):
    """A random gt/pred pair: Voronoi regions, pred seeds jittered from gt's, void and crowd, merges,
    wrong categories, JSON areas that disagree with the PNG; ids random in [1, 2^24)."""
    yy, xx = np.mgrid[:size, :size]
    num = int(rng.integers(1, 9))
    seeds = rng.uniform(0, size, (num, 2))

    def regions(points):
        distance = (yy[..., None] - points[:, 0]) ** 2 + (xx[..., None] - points[:, 1]) ** 2
        return np.argmin(distance + rng.uniform(0, 4, distance.shape), axis=-1)  # [S, S] region index

    gt_index = regions(seeds)
    pred_index = regions(seeds + rng.normal(0, rng.uniform(0, 4), seeds.shape))
    gt_ids_of = rng.choice(np.arange(1, 256 ** 3), num, replace=False) * (rng.random(num) > 0.15)
    pred_ids_of = rng.choice(np.arange(1, 256 ** 3), num, replace=False) * (rng.random(num) > 0.15)
    merge = rng.random(num) < 0.15
    pred_ids_of[merge] = pred_ids_of[0]  # some regions merged into one predicted segment
    gt_ids, pred_ids = gt_ids_of[gt_index], pred_ids_of[pred_index]
    category = rng.integers(1, 5, num)
    gt_segments = [{"id": int(i), "category_id": int(category[k]), "area": int((gt_ids == i).sum())
                    + int(rng.random() < 0.05) * int(rng.integers(1, 5)),  # sometimes a JSON area differs
                    "iscrowd": int(rng.random() < 0.2)}
                   for k, i in enumerate(gt_ids_of)
                   if i and (gt_ids == i).any() and rng.random() > 0.05]  # rarely a PNG id left out of the JSON
    pred_category = np.where(rng.random(num) < 0.75, category, rng.integers(1, 5, num))
    pred_segments = {int(i): {"id": int(i), "category_id": int(pred_category[k])}
                     for k, i in enumerate(pred_ids_of) if i and (pred_ids == i).any()}
    return gt_ids, gt_segments, pred_ids, list(pred_segments.values())


@pytest.mark.parametrize("seed", range(6))
def test_random_inputs_match_the_reference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    args = write_case(tmp_path, [random_image(rng) for _ in range(12)])
    result, expected = panoptic_quality(*args), reference_pq(*args)
    for group in ("All", "Things", "Stuff"):
        r = result[group]
        assert [r["pq"], r["sq"], r["rq"]] == pytest.approx(expected[group][:3], abs=1e-12)
        assert r["n"] == expected[group][3]
    assert {c: counts(result, c) for c in result["per_class"]} == expected["per_class"]
    tp, fp, fn = np.sum([counts(result, c) for c in result["per_class"]], axis=0)
    assert tp > 0 and fp > 0 and fn > 0  # the random cases exercise every outcome


def test_shapes_ground_truth_against_itself(tiny_shapes):
    gt_json = tiny_shapes / "annotations" / "panoptic_val.json"
    assert any(s["iscrowd"] for a in json.loads(gt_json.read_text())["annotations"] for s in a["segments_info"])
    folder = tiny_shapes / "panoptic" / "val"
    result = panoptic_quality(gt_json, gt_json, folder, folder)
    for group, n in (("All", 6), ("Things", 4), ("Stuff", 2)):
        assert result[group] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": n}
    assert all(r["fp"] == 0 and r["fn"] == 0 for r in result["per_class"].values())


def test_per_image_stats_on_arrays():
    gt_segments = _segments(SCENE, SCENE_CATEGORY)
    stats = pq_stats_per_image(SCENE, gt_segments, SCENE, _segments(SCENE, {3: 3, 4: 4, 7: 2, 9: 2}),
                               {c["id"]: c for c in CATEGORIES})
    assert stats[1] == {"tp": 0, "fp": 0, "fn": 1, "iou": 0.0}  # 7 predicted as category 2
    assert stats[2] == {"tp": 1, "fp": 1, "fn": 0, "iou": 1.0}


def test_loaded_dicts_are_accepted_and_checked(tmp_path):
    gt_json, pred_json, gt_folder, pred_folder = _broken(tmp_path, SCENE, _segments(SCENE, SCENE_CATEGORY))
    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    assert panoptic_quality(gt, pred, gt_folder, pred_folder) == panoptic_quality(gt_json, pred_json, gt_folder,
                                                                                  pred_folder)
    pred["annotations"][0]["segments_info"].append(dict(pred["annotations"][0]["segments_info"][0]))
    with pytest.raises(ValueError, match="prediction JSON.*appears twice"):
        panoptic_quality(gt, pred, gt_folder, pred_folder)
    with pytest.raises(ValueError, match="gt_folder is needed"):
        panoptic_quality(gt, pred_json)


def test_format_pq_table_rows(tmp_path):
    pred = np.where(SCENE == 9, 0, SCENE)
    result = evaluate(tmp_path, [(SCENE, _segments(SCENE, SCENE_CATEGORY), pred,
                                  _segments(pred, {k: v for k, v in SCENE_CATEGORY.items() if k != 9}))])
    lines = format_pq_table(result, {1: "a", 2: "b", 3: "sky", 4: "ground"}).splitlines()
    assert lines[1].split() == ["All", "75.0", "75.0", "75.0", "4"]
    assert lines[2].split() == ["Things", "50.0", "50.0", "50.0", "2"]
    assert [line.split() for line in lines if line.split()[:1] == ["b"]] == [["b", "0.0", "0.0", "0.0", "0", "0", "1"]]
