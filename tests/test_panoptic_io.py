"""COCO panoptic I/O: the id <-> RGB codec, PNGs, JSON checks and the predictions round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from minimrcnn.data import shapes
from minimrcnn.evaluation import (load_panoptic_json, panoptic_quality, read_panoptic_png, segments_info_from_ids,
                                  write_panoptic_png, write_panoptic_predictions)
from minimrcnn.evaluation.panoptic_io import MAX_SEGMENT_ID, id_to_rgb, rgb_to_id

CATEGORIES = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 1},
              {"id": 5, "name": "sky", "isthing": 0}]


def test_codec_known_values_and_inverse():
    assert id_to_rgb(np.array([[1 + 256 * 2 + 65536 * 3, MAX_SEGMENT_ID, 0]])).tolist() == \
        [[[1, 2, 3], [255, 255, 255], [0, 0, 0]]]
    ids = np.random.default_rng(0).integers(0, MAX_SEGMENT_ID + 1, (7, 9))
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (7, 9, 3)
    back = rgb_to_id(rgb)
    assert back.dtype == np.int64 and np.array_equal(back, ids)
    assert shapes.ids_to_rgb is id_to_rgb and shapes.rgb_to_ids is rgb_to_id  # one codec for data and evaluation


def test_codec_refuses_what_an_rgb_png_cannot_hold():
    with pytest.raises(ValueError, match="16777215"):
        id_to_rgb(np.array([[256 ** 3]]))
    with pytest.raises(ValueError, match=r"\[-1, 0\]"):
        id_to_rgb(np.array([[-1, 0]]))
    with pytest.raises(TypeError, match="integers"):
        id_to_rgb(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        rgb_to_id(np.zeros((2, 2, 4), dtype=np.uint8))


def test_png_round_trip_and_encoding(tmp_path):
    ids = np.random.default_rng(1).integers(0, MAX_SEGMENT_ID + 1, (5, 6))
    write_panoptic_png(tmp_path / "a.png", ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "a.png"), ids)
    rgb = np.array(Image.open(tmp_path / "a.png")).astype(np.int64)  # decoded without the package
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids)
    Image.fromarray(id_to_rgb(ids)).convert("RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_panoptic_png(tmp_path / "rgba.png"), ids)


def test_png_errors_name_the_file(tmp_path):
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match=r"grey\.png.*mode 'L'"):
        read_panoptic_png(tmp_path / "grey.png")
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        read_panoptic_png(tmp_path / "absent.png")
    with pytest.raises(ValueError, match=r"b\.png.*\[H, W\]"):
        write_panoptic_png(tmp_path / "b.png", np.zeros((2, 2, 2), dtype=np.int64))


def _prediction(image_id, ids, category, scores):
    isthing = {c["id"]: bool(c["isthing"]) for c in CATEGORIES}
    return {"image_id": image_id, "file_name": f"{image_id:04d}.png", "segment_ids": ids,
            "segments_info": segments_info_from_ids(ids, category, isthing, scores)}


def test_segments_info_from_ids():
    ids = np.array([[0, 4, 4, 0], [0, 4, 0, 0], [9, 9, 9, 9]])
    segments = segments_info_from_ids(ids, {4: 1, 9: 5}, {1: True, 5: False}, scores={4: 0.75, 9: 0.5})
    assert segments == [
        {"id": 4, "category_id": 1, "isthing": 1, "area": 3, "bbox": [1, 0, 2, 2], "iscrowd": 0, "score": 0.75},
        {"id": 9, "category_id": 5, "isthing": 0, "area": 4, "bbox": [0, 2, 4, 1], "iscrowd": 0}]
    assert segments[0]["bbox"] == shapes.mask_bbox(ids == 4)
    assert segments_info_from_ids(ids, {7: 1}, {1: True})[0]["bbox"] == [0, 0, 0, 0]
    with pytest.raises(KeyError, match="category 3"):
        segments_info_from_ids(ids, {4: 3}, {1: True})
    with pytest.raises(ValueError, match="void"):
        segments_info_from_ids(ids, {0: 1}, {1: True})


def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    predictions = []
    for image_id in (3, 8):
        ids = rng.choice(np.array([0, 17, 70000, MAX_SEGMENT_ID], dtype=np.int64), (6, 7))
        predictions.append(_prediction(image_id, ids, {17: 1, 70000: 2, MAX_SEGMENT_ID: 5},
                                       {17: 0.9, 70000: 0.6}))
    plain = [list(p["segments_info"]) for p in predictions]
    first = predictions[1]["segments_info"][0]  # numpy values inside segments_info are written as plain JSON
    predictions[1]["segments_info"][0] = dict(first, area=np.int64(first["area"]), bbox=np.array(first["bbox"]),
                                              score=np.float64(first["score"]))
    content = write_panoptic_predictions(predictions, tmp_path / "out" / "pred.json", tmp_path / "pngs", CATEGORIES)
    loaded = load_panoptic_json(tmp_path / "out" / "pred.json")
    assert loaded == json.loads(json.dumps(content))
    assert loaded["categories"] == CATEGORIES
    assert [i["id"] for i in loaded["images"]] == [3, 8] and loaded["images"][0]["height"] == 6
    for prediction, annotation, segments in zip(predictions, loaded["annotations"], plain):
        assert annotation["image_id"] == prediction["image_id"]
        assert annotation["file_name"] == prediction["file_name"]
        assert annotation["segments_info"] == segments
        assert np.array_equal(read_panoptic_png(tmp_path / "pngs" / annotation["file_name"]),
                              prediction["segment_ids"])
    # the written files are a complete COCO panoptic result: as ground truth they score PQ 1 against themselves
    gt = dict(loaded, annotations=[dict(a, segments_info=[dict(s, iscrowd=0) for s in a["segments_info"]])
                                   for a in loaded["annotations"]])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    pngs = tmp_path / "pngs"
    result = panoptic_quality(tmp_path / "gt.json", tmp_path / "out" / "pred.json", pngs, pngs)
    assert result["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}


def test_write_refuses_inconsistent_predictions(tmp_path):
    ids = np.array([[0, 4], [9, 9]])
    good = _prediction(1, ids, {4: 1, 9: 5}, None)
    for broken, message in [
        (dict(good, segments_info=good["segments_info"][:1]), r"image 1: segments_info ids \[4\] differ .* \[4, 9\]"),
        (dict(good, segments_info=good["segments_info"] * 2), "differ"),
        (dict(good, file_name="dir/x.png"), "plain 'name.png'"),
        (dict(good, file_name="x.jpg"), "plain 'name.png'"),
        (dict(good, segment_ids=ids[None]), r"\[H, W\]"),
        ({"image_id": 1, "file_name": "x.png"}, "no 'segment_ids'"),
    ]:
        with pytest.raises((ValueError, KeyError), match=message):
            write_panoptic_predictions([broken], tmp_path / "p.json", tmp_path / "pngs", CATEGORIES)


def test_load_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "bad.json"
    segment = {"id": 3, "category_id": 1, "area": 4, "iscrowd": 0}
    annotation = {"image_id": 7, "file_name": "x.png", "segments_info": [segment]}
    for content, message, ground_truth in [
        ("{not json", r"bad\.json: not valid JSON", False),
        ({"images": []}, r"bad\.json: .* list 'annotations'", False),
        ({"annotations": [{"image_id": 7, "segments_info": []}]}, r"annotations\[0\] has no 'file_name'", False),
        ({"annotations": [dict(annotation, segments_info=[segment, segment])]},
         r"image_id 7\): segment id 3 appears twice", False),
        ({"annotations": [dict(annotation, segments_info=[dict(segment, id=0)])]}, "segment id 0 is void", False),
        ({"annotations": [annotation]}, r"bad\.json: .* list 'categories'", True),
        ({"annotations": [dict(annotation, segments_info=[{"id": 3, "category_id": 1}])], "categories": CATEGORIES},
         r"image_id 7\): a segment 3 has no \['area', 'iscrowd'\]", True),
        ({"annotations": [], "categories": [{"id": 1}]}, r"categories\[0\] needs 'id' and 'isthing'", True),
    ]:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=message):
            load_panoptic_json(path, ground_truth=ground_truth)
    with pytest.raises(FileNotFoundError, match=r"nothing\.json"):
        load_panoptic_json(tmp_path / "nothing.json")
    path.write_text(json.dumps({"annotations": [annotation], "categories": CATEGORIES}))
    assert load_panoptic_json(path, ground_truth=True)["annotations"] == [annotation]


def test_panoptic_io_needs_only_numpy_and_pil():
    import ast
    import minimrcnn.evaluation.panoptic_io as module

    tree = ast.parse(open(module.__file__).read())
    imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "json", "os", "pathlib", "numpy", "PIL"}, imported
