"""Panoptic evaluation of a model with a semantic head: predictions -> COCO panoptic PNG + JSON
-> Panoptic Quality (``minimrcnn.evaluation.panoptic_quality``).

``MaskRCNN.predict`` gives each image a ``panoptic_seg`` map and ``segments_info`` in the
model's contiguous categories (thing label l -> l, stuff class s -> K + s, K thing
classes). ``dataset_category_map`` maps them to the category ids of the panoptic ground
truth, ``write_predictions`` writes the COCO panoptic files and ``evaluate_panoptic`` scores
them and prints the PQ table.
"""

from __future__ import annotations

from pathlib import Path

from minimrcnn.engine import distributed as distrib
from minimrcnn.evaluation.panoptic import format_pq_table, panoptic_quality
from minimrcnn.evaluation.panoptic_io import write_panoptic_predictions

PREDICTION_FOLDER = "panoptic_predictions"  # PNGs, beside panoptic_predictions.json
SUMMARY_GROUPS = ("All", "Things", "Stuff")


def shapes_panoptic_paths(root, split: str) -> tuple[Path, Path]:
    """(panoptic JSON, PNG folder) of a shapes split under ``root``."""
    root = Path(root)
    return root / f"annotations/panoptic_{split}.json", root / "panoptic" / split


def default_panoptic_paths(instances_json) -> tuple[Path, Path]:
    """The panoptic ground truth beside a COCO instances JSON, by the usual layout:
    ``.../instances_X.json`` -> ``.../panoptic_X.json``, its PNGs in ``ROOT/panoptic/X`` (shapes)
    if that exists, else in ``.../panoptic_X/`` beside the JSON (COCO, ``pq_compute``'s default)."""
    instances_json = Path(instances_json)
    split = instances_json.stem.removeprefix("instances_")
    panoptic_json = instances_json.with_name(f"panoptic_{split}.json")
    shapes_folder = instances_json.parent.parent / "panoptic" / split
    return panoptic_json, shapes_folder if shapes_folder.is_dir() else panoptic_json.with_suffix("")


def panoptic_dataset(images, annotations, panoptic_json, panoptic_folder, config=None):
    """A ``CocoPanoptic``; with ``config``, checked to have its ``num_stuff_classes``."""
    from minimrcnn.data import CocoPanoptic

    for path, what in ((panoptic_json, "panoptic JSON"), (panoptic_folder, "panoptic PNG folder")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: {what} not found (the semantic head needs COCO panoptic "
                                    f"ground truth for {annotations})")
    dataset = CocoPanoptic(images, annotations, panoptic_json, panoptic_folder)
    if config is not None and dataset.num_stuff_classes != config.num_stuff_classes:
        raise ValueError(f"{panoptic_json}: {dataset.num_stuff_classes} stuff categories "
                         f"{dataset.stuff_names[1:]}, but config.num_stuff_classes is "
                         f"{config.num_stuff_classes}")
    return dataset


def dataset_category_map(num_classes: int, thing_category_ids, stuff_category_ids) -> dict:
    """{model category -> dataset category id}: things 1..K by ``thing_category_ids[label]``,
    stuff K + s by ``stuff_category_ids[s]`` (entry 0, the thing class, unused)."""
    num_things = num_classes - 1
    mapping = {label: int(thing_category_ids[label]) for label in range(1, num_classes)}
    mapping.update({num_things + s: int(stuff_category_ids[s]) for s in range(1, len(stuff_category_ids))})
    return mapping


def to_dataset_categories(segments_info: list[dict], category_map: dict) -> list[dict]:
    """segments_info with every ``category_id`` mapped to the dataset's (a new list)."""
    return [{**segment, "category_id": category_map[segment["category_id"]]} for segment in segments_info]


def write_predictions(predictions, dataset, json_path, png_folder, num_classes: int) -> dict:
    """predictions: [(image_id, prediction)] of a ``CocoPanoptic``'s images -> COCO panoptic files.

    Returns the JSON content (PNG file names are those of the ground truth)."""
    category_map = dataset_category_map(num_classes, dataset.category_ids, dataset.stuff_category_ids)
    entries = []
    for image_id, prediction in predictions:
        if "panoptic_seg" not in prediction:
            raise ValueError(f"image id {image_id}: the prediction has no panoptic_seg "
                             "(the model has no semantic head)")
        entries.append({
            "image_id": image_id,
            "file_name": dataset.panoptic_of_image[image_id]["file_name"],
            "segment_ids": prediction["panoptic_seg"].cpu().numpy(),
            "segments_info": to_dataset_categories(prediction["segments_info"], category_map),
        })
    return write_panoptic_predictions(entries, json_path, png_folder, dataset.panoptic_categories)


def evaluate_panoptic(predictions, dataset, out_dir, num_classes: int, print_table: bool = True) -> dict:
    """PQ of ``predictions`` ([(image_id, prediction)], this process's shard) on ``dataset``
    (a ``CocoPanoptic``). Writes ``out_dir/panoptic_predictions.json`` and its PNGs; returns
    ``panoptic_quality``'s result on every process."""
    out_dir = Path(out_dir)
    info = distrib.get_info()
    png_folder = out_dir / PREDICTION_FOLDER
    json_path = out_dir / f"{PREDICTION_FOLDER}.json"
    # Each process writes its own PNGs (distinct file names) and a JSON of its shard; rank 0 joins them.
    shard_json = json_path if not info.is_distributed else out_dir / f"{PREDICTION_FOLDER}.rank{info.rank}.json"
    content = write_predictions(predictions, dataset, shard_json, png_folder, num_classes)
    gathered = distrib.all_gather_objects(content["annotations"])
    result = None
    if info.is_main:
        if info.is_distributed:
            import json

            content = {**content, "annotations": [a for part in gathered for a in part]}
            content["images"] = [{"id": a["image_id"], "file_name": a["file_name"]} for a in content["annotations"]]
            json_path.write_text(json.dumps(content))
        gt_json = dataset.panoptic_file
        result = panoptic_quality(str(gt_json), str(json_path), str(dataset.panoptic_dir), str(png_folder))
        if print_table:
            names = {c["id"]: c.get("name", str(c["id"])) for c in dataset.panoptic_categories}
            print(format_pq_table(result, names))
    return distrib.broadcast_object(result)


def panoptic_summary(result: dict) -> dict:
    """The All / Things / Stuff rows of a PQ result, for metrics.json."""
    return {group: dict(result[group]) for group in SUMMARY_GROUPS}


__all__ = ["dataset_category_map", "default_panoptic_paths", "evaluate_panoptic", "panoptic_dataset", "panoptic_summary",
           "shapes_panoptic_paths", "to_dataset_categories", "write_predictions"]
