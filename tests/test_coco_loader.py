"""CocoInstances and collate: shapes, a hand-made COCO file with every segmentation kind, bad inputs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from minimrcnn.data import CocoFormatError, CocoInstances, collate

HEIGHT, WIDTH = 20, 30


def fortran_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed RLE counts by a plain loop over pixels in column-major order (zeros first)."""
    counts, current, run = [], 0, 0
    for x in range(mask.shape[1]):
        for y in range(mask.shape[0]):
            if mask[y, x] != current:
                counts.append(run)
                current, run = mask[y, x], 0
            run += 1
    counts.append(run)
    return counts


def rectangle(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


RLE_MASK = rectangle(2, 9, 3, 8)
COMPRESSED_MASK = rectangle(10, 18, 15, 29)
CROWD_MASK = rectangle(0, 4, 20, 30) | rectangle(6, 8, 25, 27)


def hand_made_coco() -> dict:
    """Three images; category ids 3 and 7 (not contiguous); every kind of annotation."""
    compressed = mask_utils.encode(np.asfortranarray(COMPRESSED_MASK))
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
            {"id": 11, "file_name": "b.png", "height": HEIGHT, "width": WIDTH},  # no annotations
            {"id": 12, "file_name": "c.png", "height": HEIGHT, "width": WIDTH},
        ],
        "categories": [{"id": 7, "name": "kite", "supercategory": "x"},
                       {"id": 3, "name": "car", "supercategory": "x"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0, "area": 60.0,
             "bbox": [2.0, 2.0, 12.0, 10.0], "segmentation": [[2.0, 2.0, 14.0, 2.0, 2.0, 12.0]]},
            {"id": 2, "image_id": 10, "category_id": 7, "iscrowd": 0, "area": 35.0,
             "bbox": [3.0, 2.0, 5.0, 7.0], "segmentation": {"counts": fortran_runs(RLE_MASK), "size": [HEIGHT, WIDTH]}},
            {"id": 3, "image_id": 10, "category_id": 7, "iscrowd": 0, "area": 112.0,
             "bbox": [15.0, 10.0, 14.0, 8.0],
             "segmentation": {"counts": compressed["counts"].decode("ascii"), "size": [HEIGHT, WIDTH]}},
            {"id": 4, "image_id": 10, "category_id": 3, "iscrowd": 1, "area": 44.0,
             "bbox": [20.0, 0.0, 10.0, 8.0], "segmentation": {"counts": fortran_runs(CROWD_MASK), "size": [HEIGHT, WIDTH]}},
            {"id": 5, "image_id": 12, "category_id": 3, "iscrowd": 0, "area": 0.0,  # degenerate: dropped
             "bbox": [4.0, 4.0, 0.0, 3.0], "segmentation": [[4.0, 4.0, 4.0, 7.0, 4.0, 5.0]]},
            {"id": 6, "image_id": 12, "category_id": 7, "iscrowd": 0, "area": 4.0,
             "bbox": [1.0, 1.0, 2.0, 2.0], "segmentation": [[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]]},
        ],
    }


def write_dataset(folder, content, images=("a.png", "b.png", "c.png")) -> tuple:
    rng = np.random.default_rng(0)
    for name in images:
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / name)
    annotation_file = folder / "instances.json"
    annotation_file.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder, annotation_file


def test_hand_made_file(tmp_path):
    image_dir, annotation_file = write_dataset(tmp_path, hand_made_coco())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoInstances(image_dir, annotation_file)
    messages = [str(w.message) for w in caught if "degenerate" in str(w.message)]
    assert len(messages) == 1 and "dropped 1 annotation" in messages[0] and "5" in messages[0]
    assert str(annotation_file) in messages[0]

    assert len(dataset) == 3 and dataset.num_classes == 3
    assert dataset.category_ids == [0, 3, 7]  # label -> category id, sorted by id
    assert dataset.class_names == ["__background__", "car", "kite"]
    assert dataset.label_of_category == {3: 1, 7: 2}

    image, target = dataset[0]
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    expected_pixels = np.array(Image.open(image_dir / "a.png")).transpose(2, 0, 1) / 255
    assert np.allclose(image.numpy(), expected_pixels, atol=1e-6)
    assert target["image_id"] == 10
    assert target["labels"].tolist() == [1, 2, 2, 1] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [0, 0, 0, 1] and target["iscrowd"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 2, 14, 12], [3, 2, 8, 9], [15, 10, 29, 18], [20, 0, 30, 8]]
    masks = target["masks"]
    assert masks.shape == (4, HEIGHT, WIDTH) and masks.dtype == torch.uint8
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(annotation_file))
    assert np.array_equal(masks[0].numpy(), reference.annToMask(reference.anns[1]))  # polygon
    assert masks[0].sum() > 0
    assert np.array_equal(masks[1].numpy(), RLE_MASK)  # uncompressed RLE
    assert np.array_equal(masks[2].numpy(), COMPRESSED_MASK)  # compressed RLE
    assert np.array_equal(masks[3].numpy(), CROWD_MASK)  # crowd

    image, target = dataset[1]  # no annotations
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, HEIGHT, WIDTH)
    assert target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)
    assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64

    _, target = dataset[2]  # the degenerate box is gone, the other stays
    assert target["labels"].tolist() == [2] and target["boxes"].tolist() == [[1, 1, 3, 3]]


def test_remove_images_without_annotations(tmp_path):
    image_dir, annotation_file = write_dataset(tmp_path, hand_made_coco())
    with pytest.warns(UserWarning, match="degenerate"):
        dataset = CocoInstances(image_dir, annotation_file, remove_images_without_annotations=True)
    assert dataset.image_ids == [10, 12]


def test_shapes_set(tiny_shapes):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_val.json")
    assert len(dataset) == 8 and dataset.category_ids == [0, 1, 2, 3, 4]
    assert dataset.class_names == ["__background__", "square", "circle", "triangle", "star"]
    coco = dataset.coco
    saw_crowd = False
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 128, 128)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"]))
        assert len(annotations) == len(target["labels"]) >= 1
        for annotation, box, label, mask, crowd in zip(annotations, target["boxes"], target["labels"],
                                                        target["masks"], target["iscrowd"]):
            x, y, w, h = annotation["bbox"]
            assert box.tolist() == [x, y, x + w, y + h]
            assert dataset.category_ids[int(label)] == annotation["category_id"]
            assert np.array_equal(mask.numpy(), coco.annToMask(annotation))
            assert int(crowd) == annotation["iscrowd"]
            saw_crowd |= bool(crowd)
    assert saw_crowd


def test_coco_property_is_quiet(tiny_shapes, capsys):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_train.json")
    coco = dataset.coco
    assert capsys.readouterr().out == ""
    assert len(coco.getImgIds()) == 16 and dataset.coco is coco


def test_collate(tiny_shapes):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_train.json")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == [1, 2, 3]
    assert collate([]) == ([], [])


def test_transforms_are_applied(tiny_shapes):
    seen = []

    def record(image, target):
        seen.append(target["image_id"])
        return image * 0, target

    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_val.json",
                            transforms=record)
    image, _ = dataset[3]
    assert seen == [4] and float(image.abs().max()) == 0


# ---------------------------------------------------------------- bad inputs


def broken(mutate):
    content = hand_made_coco()
    mutate(content)
    return content


BAD_FILES = {
    "malformed JSON": ('{"images": [', r"instances\.json: malformed JSON"),
    "top level not an object": ("[1, 2]", r"instances\.json: expected a JSON object"),
    "missing annotations": (broken(lambda c: c.pop("annotations")), r"instances\.json: .*'annotations'"),
    "image without file_name": (broken(lambda c: c["images"][1].pop("file_name")),
                                r"instances\.json: image #1 \(id 11\) is missing the field 'file_name'"),
    "annotation without bbox": (broken(lambda c: c["annotations"][2].pop("bbox")),
                                r"instances\.json: annotation id 3 is missing the field 'bbox'"),
    "annotation without id": (broken(lambda c: c["annotations"][1].pop("id")),
                              r"instances\.json: annotation id #1 is missing the field 'id'"),
    "category without name": (broken(lambda c: c["categories"][0].pop("name")),
                              r"instances\.json: category #0 is missing the field 'name'"),
    "unknown image": (broken(lambda c: c["annotations"][3].update(image_id=99)),
                      r"instances\.json: annotation id 4 refers to unknown image id 99"),
    "unknown category": (broken(lambda c: c["annotations"][0].update(category_id=5)),
                         r"instances\.json: annotation id 1 refers to unknown category id 5"),
    "segmentation is a number": (broken(lambda c: c["annotations"][0].update(segmentation=7)),
                                 r"instances\.json: annotation id 1: segmentation must be .* got int"),
    "segmentation is a string": (broken(lambda c: c["annotations"][5].update(segmentation="abc")),
                                 r"instances\.json: annotation id 6: segmentation must be .* got str"),
    "polygon of strings": (broken(lambda c: c["annotations"][0].update(segmentation=[["1", "2", "3"]])),
                           r"instances\.json: annotation id 1: a polygon must be"),
    "RLE counts of wrong type": (broken(lambda c: c["annotations"][1]["segmentation"].update(counts=3)),
                                 r"instances\.json: annotation id 2: RLE 'counts' must be"),
    "RLE of another size": (broken(lambda c: c["annotations"][2]["segmentation"].update(size=[5, 5])),
                            r"instances\.json: annotation id 3: RLE 'size' \[5, 5\] does not match"),
    "bbox of three numbers": (broken(lambda c: c["annotations"][0].update(bbox=[1, 2, 3])),
                              r"instances\.json: annotation id 1: bbox must be"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_annotation_files(tmp_path, case):
    content, message = BAD_FILES[case]
    image_dir, annotation_file = write_dataset(tmp_path, copy.deepcopy(content))
    with pytest.raises(CocoFormatError, match=message):
        CocoInstances(image_dir, annotation_file)
    assert issubclass(CocoFormatError, ValueError)


def test_missing_image_file(tmp_path):
    image_dir, annotation_file = write_dataset(tmp_path, hand_made_coco(), images=("a.png", "c.png"))
    with pytest.warns(UserWarning, match="degenerate"):
        dataset = CocoInstances(image_dir, annotation_file)
    dataset[0]
    with pytest.raises(FileNotFoundError, match=r"b\.png: image file of image id 11 not found"):
        dataset[1]


def test_image_size_disagreeing_with_json(tmp_path):
    content = hand_made_coco()
    content["images"][0]["height"] = HEIGHT + 1
    content["annotations"] = []
    image_dir, annotation_file = write_dataset(tmp_path, content)
    with pytest.raises(ValueError, match=r"a\.png: image id 10 is 30x20 pixels but .* says 30x21"):
        CocoInstances(image_dir, annotation_file)[0]


def test_short_polygons_enclose_nothing(tmp_path):
    content = hand_made_coco()
    content["annotations"][0]["segmentation"] = [[2.0, 2.0, 14.0, 2.0]]  # two points: no area
    image_dir, annotation_file = write_dataset(tmp_path, content)
    with pytest.warns(UserWarning, match="degenerate"):
        dataset = CocoInstances(image_dir, annotation_file)
    _, target = dataset[0]
    assert target["masks"][0].sum() == 0 and target["masks"][1].sum() == RLE_MASK.sum()


def test_grayscale_images_become_rgb(tmp_path):
    content = hand_made_coco()
    content["annotations"] = []
    image_dir, annotation_file = write_dataset(tmp_path, content)
    gray = np.arange(HEIGHT * WIDTH, dtype=np.uint8).reshape(HEIGHT, WIDTH)
    Image.fromarray(gray, mode="L").save(image_dir / "a.png")  # real COCO has a few grayscale images
    image, target = CocoInstances(image_dir, annotation_file)[0]
    assert image.shape == (3, HEIGHT, WIDTH)
    assert torch.equal(image[0], image[2]) and torch.allclose(image[1], torch.from_numpy(gray) / 255)
