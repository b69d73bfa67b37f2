"""COCO instances plus semantic targets from COCO panoptic annotations: ``CocoPanoptic``.

Shape shorthand: H, W an image's height and width; S stuff categories.

``CocoPanoptic(image_dir, annotation_file, panoptic_file, panoptic_dir)[i]`` gives what
``CocoInstances`` gives plus ``target["sem_seg"]``: uint8 [H, W], the semantic class of
every pixel, prepared as Detectron2 prepares COCO panoptic data for Panoptic FPN:

- ``SEMANTIC_THING`` (0): a pixel of any thing segment (crowds included);
- 1..S: the stuff categories in ascending category id (``stuff_category_ids[class]`` maps
  a class back to its COCO category id);
- ``SEMANTIC_IGNORE`` (255): a pixel of no segment (void); it takes no part in the loss.

The panoptic PNG of an image is ``panoptic_dir / file_name`` of its entry in the panoptic
JSON, its pixels segment ids ``R + 256 G + 256^2 B`` (0 is void).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minimrcnn.data.coco import CocoFormatError, CocoInstances

SEMANTIC_THING = 0  # the class of every thing pixel (modeling.semantic_head.THING_CLASS)
SEMANTIC_IGNORE = 255  # void pixels (modeling.semantic_head.IGNORE_LABEL)


def rgb_to_segment_ids(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> segment ids [H, W] int64 = R + 256 G + 256^2 B."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def load_panoptic_json(path) -> dict:
    """Read a COCO panoptic JSON and check the fields the semantic targets need."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: malformed JSON: {error}") from None
    for field in ("annotations", "categories"):
        if not isinstance(data.get(field) if isinstance(data, dict) else None, list):
            raise CocoFormatError(f"{path}: missing or non-list top-level field '{field}'")
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "isthing" not in category:
            raise CocoFormatError(f"{path}: category #{index} needs 'id' and 'isthing'")
    for index, annotation in enumerate(data["annotations"]):
        for field in ("image_id", "file_name", "segments_info"):
            if not isinstance(annotation, dict) or field not in annotation:
                raise CocoFormatError(f"{path}: annotation #{index} is missing the field '{field}'")
    return data


class CocoPanoptic(CocoInstances):
    """``CocoInstances`` whose targets also hold ``sem_seg`` (see the module docstring).

    Args:
        image_dir, annotation_file, transforms, remove_images_without_annotations: as
            ``CocoInstances`` (the instances JSON gives boxes, labels and masks).
        panoptic_file: the COCO panoptic JSON of the same images.
        panoptic_dir: the folder of its PNGs.
    """

    def __init__(self, image_dir, annotation_file, panoptic_file, panoptic_dir, transforms=None,
                 remove_images_without_annotations=False):
        super().__init__(image_dir, annotation_file, transforms, remove_images_without_annotations)
        self.panoptic_file = Path(panoptic_file)
        self.panoptic_dir = Path(panoptic_dir)
        self.panoptic_dataset = load_panoptic_json(self.panoptic_file)
        self.panoptic_categories = self.panoptic_dataset["categories"]
        stuff = sorted((c for c in self.panoptic_categories if not c["isthing"]), key=lambda c: c["id"])
        self.stuff_category_ids = [None] + [c["id"] for c in stuff]  # semantic class -> category id
        self.stuff_names = ["things"] + [c.get("name", str(c["id"])) for c in stuff]
        self.semantic_class_of = {c["id"]: SEMANTIC_THING for c in self.panoptic_categories if c["isthing"]}
        self.semantic_class_of.update({c["id"]: k for k, c in enumerate(stuff, start=1)})
        self.panoptic_of_image = {a["image_id"]: a for a in self.panoptic_dataset["annotations"]}
        missing = [i for i in self.image_ids if i not in self.panoptic_of_image]
        if missing:
            raise CocoFormatError(f"{self.panoptic_file}: no panoptic annotation for image id(s) {missing[:5]} "
                                  f"of {self.annotation_file}")

    @property
    def num_stuff_classes(self) -> int:
        return len(self.stuff_category_ids) - 1

    def load_sem_seg(self, image_id: int) -> torch.Tensor:
        """uint8 [H, W] semantic classes of one image id (thing 0, stuff 1..S, void 255)."""
        annotation = self.panoptic_of_image[image_id]
        path = self.panoptic_dir / annotation["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: panoptic PNG of image id {image_id} not found "
                                    f"(listed in {self.panoptic_file})")
        with Image.open(path) as picture:
            ids = rgb_to_segment_ids(np.array(picture.convert("RGB")))  # [H, W]
        info = self.images[image_id]
        if ids.shape != (info["height"], info["width"]):
            raise ValueError(f"{path}: {ids.shape[1]}x{ids.shape[0]} pixels but image id {image_id} is "
                             f"{info['width']}x{info['height']}")
        sem_seg = np.full(ids.shape, SEMANTIC_IGNORE, dtype=np.uint8)
        for segment in annotation["segments_info"]:
            category = segment["category_id"]
            if category not in self.semantic_class_of:
                raise CocoFormatError(f"{self.panoptic_file}: segment {segment['id']} of image id {image_id} "
                                      f"has unknown category id {category}")
            sem_seg[ids == segment["id"]] = self.semantic_class_of[category]
        listed = {segment["id"] for segment in annotation["segments_info"]}
        unlisted = sorted(set(np.unique(ids).tolist()) - listed - {0})
        if unlisted:
            raise CocoFormatError(f"{path}: segment id {unlisted[0]} is in the PNG but not in the "
                                  f"segments_info of image id {image_id} in {self.panoptic_file}")
        return torch.from_numpy(sem_seg)

    def load_target(self, image_id: int) -> dict:
        target = super().load_target(image_id)
        target["sem_seg"] = self.load_sem_seg(image_id)
        return target


def shapes_panoptic(root, split: str, transforms=None) -> CocoPanoptic:
    """The ``split`` ("train" or "val") of a shapes set under ``root`` as a ``CocoPanoptic``."""
    root = Path(root)
    return CocoPanoptic(root / "images", root / f"annotations/instances_{split}.json",
                        root / f"annotations/panoptic_{split}.json", root / "panoptic" / split, transforms)


__all__ = ["SEMANTIC_IGNORE", "SEMANTIC_THING", "CocoPanoptic", "load_panoptic_json",
           "rgb_to_segment_ids", "shapes_panoptic"]
