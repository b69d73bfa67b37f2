"""The shapes generator: determinism, exact masks through pycocotools, panoptic consistency."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from minimrcnn.data import shapes
from minimrcnn.data.shapes import SHAPES_CATEGORIES, ensure_shapes, generate_shapes, rgb_to_ids

SMALL = {"num_train": 3, "num_val": 2, "image_size": 64}


def load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def tight_xywh(mask: np.ndarray) -> list[int]:
    """Brute-force tight box: scan every pixel."""
    xs, ys = [], []
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                xs.append(x)
                ys.append(y)
    return [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1]


def all_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_generation_is_deterministic(tmp_path):
    first = generate_shapes(tmp_path / "a", seed=3, **SMALL)
    second = generate_shapes(tmp_path / "b", seed=3, num_workers=2, **SMALL)  # processes do not matter
    other = generate_shapes(tmp_path / "c", seed=4, **SMALL)
    assert all_files(first) == all_files(second)
    for relative in all_files(first):
        if relative.suffix == ".json":
            assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
        else:
            assert np.array_equal(np.array(Image.open(first / relative)), np.array(Image.open(second / relative)))
    differs = [relative for relative in all_files(first) if relative.suffix == ".png"
               and not np.array_equal(np.array(Image.open(first / relative)), np.array(Image.open(other / relative)))]
    assert differs, "another seed must give other images"


def test_layout_and_categories(tiny_shapes):
    for split, count in (("train", 16), ("val", 8)):
        instances = json.loads((tiny_shapes / "annotations" / f"instances_{split}.json").read_text())
        panoptic = json.loads((tiny_shapes / "annotations" / f"panoptic_{split}.json").read_text())
        assert [c["name"] for c in instances["categories"]] == ["square", "circle", "triangle", "star"]
        assert [c["id"] for c in instances["categories"]] == [1, 2, 3, 4]
        assert all(c["supercategory"] == "shape" for c in instances["categories"])
        assert {(c["name"], c["isthing"]) for c in panoptic["categories"]} >= {("sky", 0), ("ground", 0), ("square", 1)}
        assert panoptic["categories"] == SHAPES_CATEGORIES
        assert len(instances["images"]) == count and {"info", "licenses"} <= instances.keys()
        for image in instances["images"]:
            assert (image["height"], image["width"]) == (128, 128)
            assert (tiny_shapes / "images" / image["file_name"]).is_file()
            assert (tiny_shapes / "panoptic" / split / image["file_name"]).is_file()
        per_image = np.bincount([a["image_id"] for a in instances["annotations"]], minlength=count + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= shapes.MAX_INSTANCES + 1  # + a crowd in val
        ids = [a["id"] for a in instances["annotations"]]
        assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_round_trip_through_pycocotools(tiny_shapes, split):
    coco = load_coco(tiny_shapes / "annotations" / f"instances_{split}.json")
    kinds = set()
    for image in coco.dataset["images"]:
        index = image["id"] - 1
        drawn = shapes.render_image(0, split, index, 128)
        assert np.array_equal(drawn["pixels"], np.array(Image.open(tiny_shapes / "images" / image["file_name"])))
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(annotations) == len(drawn["shapes"])
        union = np.zeros((128, 128), dtype=np.int64)
        # Derived here: a shape shows where it is painted and no shape painted after it is.
        full_masks = [shape["full_mask"] for shape in drawn["shapes"]]  # painting order, bottom first
        for number, (annotation, shape) in enumerate(zip(annotations, drawn["shapes"])):
            painted_later = np.zeros((128, 128), dtype=bool)
            for later in full_masks[number + 1:]:
                painted_later |= later
            visible = full_masks[number] & ~painted_later
            decoded = coco.annToMask(annotation)
            assert np.array_equal(decoded, visible), f"annotation {annotation['id']}"
            assert np.array_equal(shape["visible_mask"], visible)
            assert annotation["area"] == int(visible.sum()) >= shapes.MIN_VISIBLE_PIXELS
            assert annotation["bbox"] == tight_xywh(visible)
            assert annotation["category_id"] == shape["category_id"]
            segmentation = annotation["segmentation"]
            if annotation["iscrowd"]:
                kinds.add("crowd")
                assert isinstance(segmentation["counts"], list)  # uncompressed, as COCO stores crowds
            elif isinstance(segmentation, list):
                kinds.add("polygon")
                assert np.array_equal(shape["full_mask"], visible)  # only unoccluded shapes are polygons
            else:
                kinds.add("rle")
                assert isinstance(segmentation["counts"], str)
                assert visible.sum() >= shapes.MIN_VISIBLE_FRACTION * shape["full_mask"].sum()
            union += visible
        assert union.max() <= 1, "visible masks of one image must be disjoint"
    assert kinds >= {"polygon", "rle"}
    if split == "val":
        assert "crowd" in kinds


def test_sizes_cover_small_and_medium(tiny_shapes):
    annotations = json.loads((tiny_shapes / "annotations" / "instances_train.json").read_text())["annotations"]
    areas = np.array([a["area"] for a in annotations])
    assert (areas < 32**2).any() and (areas >= 32**2).any()


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_png_matches_segments_info(tiny_shapes, split):
    panoptic = json.loads((tiny_shapes / "annotations" / f"panoptic_{split}.json").read_text())
    instances = load_coco(tiny_shapes / "annotations" / f"instances_{split}.json")
    isthing = {c["id"]: c["isthing"] for c in panoptic["categories"]}
    for entry in panoptic["annotations"]:
        ids = rgb_to_ids(np.array(Image.open(tiny_shapes / "panoptic" / split / entry["file_name"])))
        segments = entry["segments_info"]
        assert set(np.unique(ids).tolist()) == {s["id"] for s in segments}  # every pixel labelled, no void
        for segment in segments:
            inside = ids == segment["id"]
            assert segment["area"] == int(inside.sum())
            assert segment["bbox"] == tight_xywh(inside)
        things = [s for s in segments if isthing[s["category_id"]]]
        stuff = [s for s in segments if not isthing[s["category_id"]]]
        assert {s["category_id"] for s in stuff} <= {shapes.SKY_ID, shapes.GROUND_ID} and stuff
        annotations = instances.loadAnns(instances.getAnnIds(imgIds=entry["image_id"]))
        assert [(s["category_id"], s["area"], s["bbox"], s["iscrowd"]) for s in things] == \
            [(a["category_id"], a["area"], a["bbox"], a["iscrowd"]) for a in annotations]
        for segment, annotation in zip(things, annotations):
            assert np.array_equal(ids == segment["id"], instances.annToMask(annotation).astype(bool))


def test_uncompressed_rle_helper_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        rle = shapes.uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *mask.shape))
        assert np.array_equal(decoded, mask)


def test_ensure_shapes_generates_once_and_atomically(tmp_path, monkeypatch):
    root = tmp_path / "data" / "shapes"
    calls = []
    original = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda *a, **k: calls.append(k) or original(*a, **k))
    assert ensure_shapes(root, **SMALL) == root
    stamp = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    ensure_shapes(root, **SMALL)
    assert len(calls) == 1 and (root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    ensure_shapes(root, **{**SMALL, "num_val": 3})  # other settings: regenerate
    assert len(calls) == 2
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 3
    assert sorted(p.name for p in root.parent.iterdir()) == ["shapes"]  # no staging folders left


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(out_dir, split, *args):
        (out_dir / "images" / "half_written.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(tmp_path / "shapes", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes(tmp_path / "x", num_train=-1)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(tmp_path / "x", image_size=4)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a shapes dataset"):
        generate_shapes(precious, **SMALL)
    assert (precious / "notes.txt").read_text() == "keep me"
