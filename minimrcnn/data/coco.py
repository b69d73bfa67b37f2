"""COCO instance segmentation as a PyTorch dataset: ``CocoInstances`` and ``collate``.

Shape shorthand: M instances in an image, H, W its height and width, K thing classes.

``CocoInstances(image_dir, annotation_file)[i]`` gives ``(image, target)``:

- ``image``: float32 [3, H, W], RGB in [0, 1];
- ``target["boxes"]``: float32 [M, 4], absolute-pixel xyxy (from the JSON ``bbox``, clipped to the image);
- ``target["labels"]``: int64 [M], contiguous labels 1..K (0 is the background);
- ``target["masks"]``: uint8 [M, H, W], decoded from polygons, uncompressed or compressed RLE;
- ``target["iscrowd"]``: int64 [M]; ``target["image_id"]``: int.

COCO category ids are not contiguous (real COCO uses 1..90 for 80 classes), so labels
are the 1-based rank of the category id: ``category_ids[label]`` maps back and
``label_of_category[category_id]`` forward. The JSON is validated when the dataset is
built, so a bad file fails at once with a message naming the file and annotation.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from minimrcnn.data.images import read_rgb_image

REQUIRED_IMAGE_FIELDS = ("id", "file_name", "height", "width")
REQUIRED_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox", "segmentation")
REQUIRED_CATEGORY_FIELDS = ("id", "name")
MAX_DROPPED_IDS_SHOWN = 5
MAX_BAD_FILES_SHOWN = 5
FILE_CHECK_THREADS = 8  # header reads wait on the disk, not the CPU: a few threads hide the latency
MIN_POLYGON_COORDS = 6  # three points


class CocoFormatError(ValueError):
    """A COCO annotation file that cannot be read; the message names the file and the entry."""


class ImageFilesError(ValueError):
    """Image files that an annotation file lists but that are missing, unreadable or mis-sized."""


def _image_file_problem(path: Path, width: int, height: int) -> str | None:
    """What is wrong with one listed image file (None: nothing). Reads the header only."""
    try:
        with Image.open(path) as picture:  # lazy: decodes no pixels
            size = picture.size
    except FileNotFoundError:
        return f"{path.name}: missing"
    except (OSError, ValueError) as error:
        return f"{path.name}: not an image PIL can read ({error})"
    if size != (width, height):
        return f"{path.name}: {size[0]}x{size[1]} pixels, listed as {width}x{height}"
    return None


def check_image_files(image_dir, images, annotation_file="the annotations") -> None:
    """Check at once that every listed image exists and has its listed size.

    images: COCO image entries (``file_name``, ``width``, ``height``). Only file headers
    are read, in a few threads, so COCO's 118k images take seconds. All problems are
    reported together in one ``ImageFilesError``: their count and the first few files.
    """
    from concurrent.futures import ThreadPoolExecutor

    image_dir = Path(image_dir)
    images = list(images)
    with ThreadPoolExecutor(FILE_CHECK_THREADS) as pool:
        problems = [p for p in pool.map(lambda info: _image_file_problem(
            image_dir / info["file_name"], info["width"], info["height"]), images) if p is not None]
    if problems:
        shown = "; ".join(problems[:MAX_BAD_FILES_SHOWN])
        more = f"; and {len(problems) - MAX_BAD_FILES_SHOWN} more" if len(problems) > MAX_BAD_FILES_SHOWN else ""
        raise ImageFilesError(f"{annotation_file}: {len(problems)} of {len(images)} listed image files in "
                              f"{image_dir} are missing or do not match: {shown}{more}")


def _check_fields(path, what: str, entry, fields) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: {what} is not a JSON object: {entry!r:.80}")
    for field in fields:
        if field not in entry:
            raise CocoFormatError(f"{path}: {what} is missing the field '{field}'")


def _check_segmentation(path, annotation: dict, image: dict) -> None:
    """Polygons: a list of flat [x0, y0, x1, y1, ...] lists; RLE: {"counts": list | str, "size": [h, w]}."""
    segmentation, ann_id = annotation["segmentation"], annotation["id"]
    where = f"{path}: annotation id {ann_id}"
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not (isinstance(polygon, list) and all(isinstance(v, numbers.Real) for v in polygon)):
                raise CocoFormatError(f"{where}: a polygon must be a flat list of x, y numbers, "
                                      f"got {polygon!r:.80}")
    elif isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if not isinstance(counts, (list, str)):
            raise CocoFormatError(f"{where}: RLE 'counts' must be a list of ints (uncompressed) "
                                  f"or a string (compressed), got {type(counts).__name__}")
        if list(size or []) != [image["height"], image["width"]]:
            raise CocoFormatError(f"{where}: RLE 'size' {size} does not match its image "
                                  f"{[image['height'], image['width']]} (image id {image['id']})")
    else:
        raise CocoFormatError(f"{where}: segmentation must be a list of polygons or an RLE dict, "
                              f"got {type(segmentation).__name__}")


def load_coco_json(path) -> dict:
    """Read and validate a COCO instances file; returns the parsed dict."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: malformed JSON: {error}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            raise CocoFormatError(f"{path}: missing or non-list top-level field '{field}'")

    images = {}
    for index, image in enumerate(data["images"]):
        _check_fields(path, f"image #{index} (id {image.get('id') if isinstance(image, dict) else '?'})",
                      image, REQUIRED_IMAGE_FIELDS)
        images[image["id"]] = image
    categories = set()
    for index, category in enumerate(data["categories"]):
        _check_fields(path, f"category #{index}", category, REQUIRED_CATEGORY_FIELDS)
        categories.add(category["id"])
    for index, annotation in enumerate(data["annotations"]):
        ann_id = annotation.get("id", f"#{index}") if isinstance(annotation, dict) else f"#{index}"
        _check_fields(path, f"annotation id {ann_id}", annotation, REQUIRED_ANNOTATION_FIELDS)
        image = images.get(annotation["image_id"])
        if image is None:
            raise CocoFormatError(f"{path}: annotation id {ann_id} refers to unknown image id "
                                  f"{annotation['image_id']!r}")
        if annotation["category_id"] not in categories:
            raise CocoFormatError(f"{path}: annotation id {ann_id} refers to unknown category id "
                                  f"{annotation['category_id']!r}")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, numbers.Real) for v in bbox)):
            raise CocoFormatError(f"{path}: annotation id {ann_id}: bbox must be [x, y, w, h], got {bbox!r:.80}")
        _check_segmentation(path, annotation, image)
    return data


def annotation_to_rle(segmentation, height: int, width: int) -> dict:
    """One compressed RLE for a COCO segmentation (as pycocotools' ``COCO.annToRLE`` does).

    Polygons with fewer than 3 points (or an odd number of coordinates) enclose no area
    and are skipped, as Detectron2 does; pycocotools would misread a 4-number one as a box.
    """
    if isinstance(segmentation, list):  # polygons: rasterize each, then union
        polygons = [p for p in segmentation if len(p) >= MIN_POLYGON_COORDS and len(p) % 2 == 0]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (crowds)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation  # already compressed


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances (boxes, labels, masks) from an image folder and an annotation JSON.

    Args:
        image_dir: folder holding the ``file_name`` of every image.
        annotation_file: COCO instances JSON (validated here; see ``load_coco_json``).
        transforms: optional callable ``(image, target) -> (image, target)``.
        remove_images_without_annotations: drop images with no (kept) annotation, as is
            usual when training on COCO; the default keeps them (empty targets).
    """

    def __init__(self, image_dir, annotation_file, transforms=None, remove_images_without_annotations=False):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.dataset = load_coco_json(self.annotation_file)

        categories = sorted(self.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [0] + [c["id"] for c in categories]  # label -> COCO category id
        self.class_names = ["__background__"] + [c["name"] for c in categories]
        self.label_of_category = {c["id"]: label for label, c in enumerate(categories, start=1)}

        self.images = {image["id"]: image for image in self.dataset["images"]}
        self.annotations_of_image = {image_id: [] for image_id in self.images}
        dropped = []
        for annotation in self.dataset["annotations"]:
            _, _, w, h = annotation["bbox"]
            if w <= 0 or h <= 0:
                dropped.append(annotation["id"])
                continue
            self.annotations_of_image[annotation["image_id"]].append(annotation)
        if dropped:
            shown = ", ".join(str(i) for i in dropped[:MAX_DROPPED_IDS_SHOWN])
            warnings.warn(f"{self.annotation_file}: dropped {len(dropped)} annotation(s) with a degenerate box "
                          f"(width or height <= 0), ids {shown}{', ...' if len(dropped) > MAX_DROPPED_IDS_SHOWN else ''}",
                          stacklevel=2)
        self.num_dropped = len(dropped)
        self.image_ids = [image["id"] for image in self.dataset["images"]]
        if remove_images_without_annotations:
            self.image_ids = [i for i in self.image_ids if self.annotations_of_image[i]]
        self._coco = None

    def check_image_files(self) -> None:
        """Every image of this dataset exists with its listed size (``ImageFilesError`` if not)."""
        check_image_files(self.image_dir, (self.images[i] for i in self.image_ids), self.annotation_file)

    @property
    def num_classes(self) -> int:
        """Thing classes plus the background (label 0)."""
        return len(self.category_ids)

    @property
    def coco(self):
        """A pycocotools ``COCO`` object over the same annotations (built quietly on first use)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self.dataset
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """float32 [3, H, W] in [0, 1] of one image id."""
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image file of image id {image_id} not found "
                                    f"(listed in {self.annotation_file})")
        image = read_rgb_image(path)  # [3, H, W], any mode (16-bit, palette, CMYK, ...)
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(f"{path}: image id {image_id} is {image.shape[2]}x{image.shape[1]} pixels but "
                             f"{self.annotation_file} says {info['width']}x{info['height']}")
        return image

    def load_target(self, image_id: int) -> dict:
        """The target dict of one image id (see the module docstring)."""
        info = self.images[image_id]
        height, width = info["height"], info["width"]
        annotations = self.annotations_of_image[image_id]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        if annotations:
            rles = [annotation_to_rle(a["segmentation"], height, width) for a in annotations]
            masks = mask_utils.decode(rles)  # [H, W, M], column-major
            masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))
        else:
            masks = torch.zeros((0, height, width), dtype=torch.uint8)
        return {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of_category[a["category_id"]] for a in annotations],
                                   dtype=torch.int64),
            "masks": masks,
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in annotations], dtype=torch.int64),
            "image_id": int(image_id),
        }

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    """[(image, target), ...] -> (list of images, list of targets); images keep their own sizes."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
