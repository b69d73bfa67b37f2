"""The COCO panoptic format: segment-id PNGs and their JSON, read and written.

A panoptic result for one image is a *segment-id map* plus a list describing its segments:

    ids            int64 [H, W]   one segment id per pixel; 0 is void (no segment)
    segments_info  list of dicts  {"id", "category_id", "isthing", "area", "bbox" [x, y, w, h],
                                   "iscrowd", "score" (things, predictions only)}

On disk (the format of the COCO panoptic API, ``panopticapi``): the map is an RGB PNG with
``id = R + 256 G + 256^2 B`` (so ids lie in [0, 2^24)), and one JSON holds ``images``,
``annotations`` (one per image: ``image_id``, ``file_name`` of its PNG, ``segments_info``)
and ``categories`` (``id``, ``name``, ``isthing``, ...). The PNGs of a JSON live in one folder,
found by ``file_name``.

This module needs only NumPy and PIL, so the data layer can share the codec with evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

MAX_SEGMENT_ID = 256 ** 3 - 1  # three 8-bit channels
VOID_ID = 0


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids int [H, W] in [0, 2^24) -> RGB uint8 [H, W, 3] with id = R + 256 G + 256^2 B."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"segment ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_SEGMENT_ID}] to fit in an RGB PNG, "
                         f"got [{ids.min()}, {ids.max()}]")
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """RGB [H, W, 3] (uint8) -> segment ids int64 [H, W]: id = R + 256 G + 256^2 B."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"an RGB segment map must have shape [H, W, 3], got {list(rgb.shape)}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_panoptic_png(path) -> np.ndarray:
    """Read a COCO panoptic PNG -> segment ids int64 [H, W] (0 = void).

    RGB (and RGBA, alpha ignored) PNGs are accepted; other modes (grey, palette) cannot
    hold the id encoding, so they are refused with the file's name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as image:
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(f"{path}: a panoptic PNG must be RGB (id = R + 256 G + 256^2 B), "
                             f"got image mode {image.mode!r}")
        rgb = np.array(image.convert("RGB"))
    return rgb_to_id(rgb)


def write_panoptic_png(path, ids: np.ndarray) -> None:
    """Write segment ids int [H, W] in [0, 2^24) as a COCO panoptic RGB PNG (lossless)."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{path}: a segment-id map must have shape [H, W], got {list(ids.shape)}")
    Image.fromarray(id_to_rgb(ids)).save(path)


def load_panoptic_json(path, *, ground_truth: bool = False) -> dict:
    """Load and check a COCO panoptic JSON; errors name the file and the entry at fault.

    Every annotation needs ``image_id``, ``file_name`` and ``segments_info``; every segment
    ``id`` (> 0, unique in its image) and ``category_id``. With ``ground_truth=True`` the file
    must also have ``categories`` and each segment ``area`` and ``iscrowd`` (the evaluation
    reads ground-truth areas from the JSON, not from the PNG).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic JSON not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    check_panoptic_json(content, path, ground_truth=ground_truth)
    return content


def check_panoptic_json(content, path, *, ground_truth: bool = False) -> None:
    """The checks of ``load_panoptic_json`` on loaded content; ``path`` names it in messages."""
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise ValueError(f"{path}: a COCO panoptic JSON needs a top-level list 'annotations'")
    if ground_truth:
        if not isinstance(content.get("categories"), list):
            raise ValueError(f"{path}: panoptic ground truth needs a top-level list 'categories'")
        for index, category in enumerate(content["categories"]):
            if not isinstance(category, dict) or "id" not in category or "isthing" not in category:
                raise ValueError(f"{path}: categories[{index}] needs 'id' and 'isthing'")
    segment_keys = ("id", "category_id", "area", "iscrowd") if ground_truth else ("id", "category_id")
    for index, annotation in enumerate(content["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise ValueError(f"{where} is not an object")
        for key in ("image_id", "file_name", "segments_info"):
            if key not in annotation:
                raise ValueError(f"{where} has no '{key}'")
        where = f"{path}: annotations[{index}] (image_id {annotation['image_id']})"
        if not isinstance(annotation["segments_info"], list):
            raise ValueError(f"{where}: 'segments_info' must be a list")
        seen = set()
        for segment in annotation["segments_info"]:
            missing = [key for key in segment_keys if key not in segment]
            if missing:
                raise ValueError(f"{where}: a segment {segment.get('id', '?')} has no {missing}")
            if segment["id"] == VOID_ID:
                raise ValueError(f"{where}: segment id 0 is void and cannot be a segment")
            if segment["id"] in seen:
                raise ValueError(f"{where}: segment id {segment['id']} appears twice in segments_info")
            seen.add(segment["id"])


def mask_bbox_xywh(mask: np.ndarray) -> list[int]:
    """Tight [x, y, w, h] box (COCO, inclusive pixel extent) of a bool mask [H, W]; zeros if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def segments_info_from_ids(ids: np.ndarray, category_of_segment: dict, isthing_of_category: dict,
                           scores: dict | None = None, iscrowd: dict | None = None) -> list[dict]:
    """Build ``segments_info`` for a segment-id map, with area and bbox measured on the map.

    ids: int [H, W], 0 void. category_of_segment: {segment id: category id}, in the order the
    segments should be listed. isthing_of_category: {category id: bool}. scores: optional
    {segment id: float}, written as ``score`` for thing segments. iscrowd: optional
    {segment id: 0/1}, default 0. Segments listed but absent from the map get area 0 and
    bbox [0, 0, 0, 0] (keep or drop them as you need; the PQ evaluation refuses them).
    """
    ids = np.asarray(ids)
    segments = []
    for segment_id, category_id in category_of_segment.items():
        if int(segment_id) == VOID_ID:
            raise ValueError("segment id 0 is void and cannot be a segment")
        if category_id not in isthing_of_category:
            raise KeyError(f"segment {segment_id}: category {category_id} not in isthing_of_category")
        mask = ids == segment_id
        isthing = bool(isthing_of_category[category_id])
        segment = {"id": int(segment_id), "category_id": int(category_id), "isthing": int(isthing),
                   "area": int(mask.sum()), "bbox": mask_bbox_xywh(mask),
                   "iscrowd": int((iscrowd or {}).get(segment_id, 0))}
        if isthing and scores is not None and segment_id in scores:
            segment["score"] = float(scores[segment_id])
        segments.append(segment)
    return segments


def _plain(value):
    """NumPy scalars/arrays inside segments_info -> JSON-serialisable Python values."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_panoptic_predictions(predictions, json_path, png_folder, categories) -> dict:
    """Write predictions as a COCO panoptic JSON + one PNG per image; returns the JSON content.

    predictions: iterable of {"image_id": int, "file_name": "xxx.png",
    "segment_ids": int [H, W] (0 void), "segments_info": [...]}. The ids of ``segments_info``
    must be exactly the non-zero ids of the map (checked here, so a broken prediction fails
    when written, not when evaluated). categories: the COCO panoptic categories list, copied
    into the JSON. The PNGs go to ``png_folder/file_name``; pass ``json_path`` and
    ``png_folder`` as ``pred_json`` and ``pred_folder`` to ``panoptic_quality`` (or to
    ``panopticapi``'s ``pq_compute``).
    """
    png_folder = Path(png_folder)
    png_folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for prediction in predictions:
        for key in ("image_id", "file_name", "segment_ids", "segments_info"):
            if key not in prediction:
                raise KeyError(f"a prediction has no '{key}' (image_id {prediction.get('image_id', '?')})")
        image_id, file_name = int(prediction["image_id"]), str(prediction["file_name"])
        if not file_name.lower().endswith(".png") or os.path.basename(file_name) != file_name:
            raise ValueError(f"image {image_id}: file_name must be a plain 'name.png', got {file_name!r}")
        ids = np.asarray(prediction["segment_ids"])
        if ids.ndim != 2:
            raise ValueError(f"image {image_id}: segment_ids must be [H, W], got {list(ids.shape)}")
        listed = [int(segment["id"]) for segment in prediction["segments_info"]]
        present = set(np.unique(ids).tolist()) - {VOID_ID}
        if len(set(listed)) != len(listed) or set(listed) != present:
            raise ValueError(f"image {image_id}: segments_info ids {sorted(listed)} differ from the "
                             f"non-zero ids of segment_ids {sorted(present)}")
        write_panoptic_png(png_folder / file_name, ids)
        images.append({"id": image_id, "file_name": file_name, "height": int(ids.shape[0]),
                       "width": int(ids.shape[1])})
        annotations.append({"image_id": image_id, "file_name": file_name,
                            "segments_info": _plain(list(prediction["segments_info"]))})
    content = {"images": images, "annotations": annotations, "categories": _plain(list(categories))}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(content, f)
    return content
