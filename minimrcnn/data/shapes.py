"""The synthetic *shapes* dataset, written as real COCO instances and panoptic annotations.

Every image has a sky (upper) and a ground (lower) region separated by a wavy horizon
("stuff"), and 1-6 flat-coloured shapes ("things": square, circle, triangle, star)
that may occlude each other. Each instance mask is exactly the instance's *visible*
pixels, so the masks of one image are disjoint and every painted object is annotated.

Layout under the output folder::

    images/{split}_{image_id:06d}.png              RGB images of both splits
    annotations/instances_{split}.json             COCO instances (things only)
    annotations/panoptic_{split}.json              COCO panoptic (things + stuff)
    panoptic/{split}/{split}_{image_id:06d}.png    segment ids, id = R + 256 G + 256^2 B

Image ids start at 1 in each split. Shapes are polygons rasterized with pycocotools, so
an unoccluded instance is stored as its exact polygon (``annToMask`` gives back the same
pixels) and an occluded one as compressed RLE of its visible pixels. About one validation
image in ten holds a crowd (``iscrowd=1``, uncompressed RLE as COCO stores crowds): a
cluster of tiny shapes of one class annotated as a single region.

Generation is deterministic: each image draws from its own generator seeded with
``(seed, split, index)``, so the result does not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from minimrcnn.evaluation.panoptic_io import id_to_rgb, rgb_to_id

THING_NAMES = ("square", "circle", "triangle", "star")
STUFF_NAMES = ("sky", "ground")
SKY_ID, GROUND_ID = 5, 6
SHAPES_CATEGORIES = [
    *({"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1} for i, n in enumerate(THING_NAMES)),
    {"id": SKY_ID, "name": "sky", "supercategory": "background", "isthing": 0},
    {"id": GROUND_ID, "name": "ground", "supercategory": "background", "isthing": 0},
]
SPLITS = ("train", "val")
NUM_TRAIN, NUM_VAL = 2000, 200  # the default set: images per split
IMAGE_SIZE = 128  # pixels per side
SEED = 0
FORMAT_VERSION = 2  # bumped whenever the generator's output changes, so old sets are regenerated

MAX_INSTANCES = 6
SIZE_RANGE = (0.10, 0.45)  # shape extent as a fraction of the image side: small and medium objects
LARGE_PROBABILITY = 0.10  # some images open with one big shape, so COCO's "large" range is not empty
LARGE_SIZE_RANGE = (0.8, 1.0)
MIN_VISIBLE_FRACTION = 0.3  # drop an instance when less than this much of it stays visible ...
MIN_VISIBLE_PIXELS = 20  # ... or when fewer pixels than this stay visible
CROWD_EVERY = 10  # val images with index % CROWD_EVERY == 1 get a crowd region
CROWD_MEMBERS = (5, 9)  # tiny shapes per crowd cluster (low inclusive, high exclusive)
CIRCLE_VERTICES = 32
# A star rather than a hexagon: at 13-20 pixels a hexagon's outline differs from a circle's by
# a pixel or two, so the class would be a coin toss; a star stays recognisable.
STAR_POINTS = 5
STAR_INNER_RATIO = 0.45
MIN_COLOUR_DISTANCE = 0.45  # RGB distance (in [0, 1] units) between a shape and its background
COORD_DECIMALS = 2  # polygon coordinates are rounded before rasterizing, so JSON holds them exactly
SEGMENT_ID_MULTIPLIER = 0x9E3779  # odd, hence a bijection mod 2^24: distinct, visible segment colours
PNG_COMPRESS_LEVEL = 1  # noisy images barely compress; level 1 writes them several times faster


# ---------------------------------------------------------------- geometry


def _unit_polygon(category_id: int) -> np.ndarray:
    """Vertices [V, 2] of a shape centred at 0 whose unrotated extent is about 1."""
    if category_id == 1:  # square
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if category_id == 2:  # circle
        angles = np.linspace(0, 2 * math.pi, CIRCLE_VERTICES, endpoint=False)
    elif category_id == 3:  # equilateral triangle of side 1, centred on its centroid
        angles = math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1) / math.sqrt(3)
    elif category_id == 4:  # five-pointed star: outer and inner vertices alternate
        angles = math.pi / 2 + np.arange(2 * STAR_POINTS) * math.pi / STAR_POINTS
        radii = 0.5 * np.where(np.arange(2 * STAR_POINTS) % 2 == 0, 1.0, STAR_INNER_RATIO)
        return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        raise ValueError(f"category_id: expected a thing id in 1..4, got {category_id}")
    return 0.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _place_polygon(rng, category_id, size, image_size, centre=None) -> list[float]:
    """A rotated, scaled shape inside the image, as a flat COCO polygon [x0, y0, x1, y1, ...]."""
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    vertices = _unit_polygon(category_id) @ rotation.T * size  # [V, 2]
    extent = float((vertices.max(axis=0) - vertices.min(axis=0)).max())
    if extent > image_size - 1:  # a big rotated shape must still fit inside the image
        vertices *= (image_size - 1) / extent
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    if centre is None:
        centre = rng.uniform(-low, image_size - high)
    vertices = np.clip(vertices + centre, 0, image_size)
    return [float(v) for v in np.round(vertices, COORD_DECIMALS).reshape(-1)]


def rasterize_polygon(polygon: list[float], height: int, width: int) -> np.ndarray:
    """[H, W] uint8 mask of a flat polygon, exactly as pycocotools' ``annToMask`` draws it."""
    rles = mask_utils.frPyObjects([polygon], height, width)
    return mask_utils.decode(rles)[:, :, 0]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a [H, W] mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # runs always start with background
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight [x, y, w, h] box (COCO xywh) around the non-zero pixels of a [H, W] mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# ---------------------------------------------------------------- background


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """[size, size] noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1))
    # Linear interpolation as a matrix [size, cells + 1]: row i weighs the two grid points around i.
    position = np.linspace(0, cells, size)
    weights = np.maximum(0, 1 - np.abs(position[:, None] - np.arange(cells + 1)[None, :]))
    return weights @ grid @ weights.T


def _draw_background(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB [S, S, 3] float in [0, 1], sky mask [S, S] bool) with a wavy horizon."""
    ys = np.arange(size)[:, None] + 0.5
    xs = np.arange(size)[None, :] + 0.5
    horizon = size * (rng.uniform(0.35, 0.65)
                      + rng.uniform(0.02, 0.08) * np.sin(2 * math.pi * rng.uniform(0.5, 2) * xs / size
                                                         + rng.uniform(0, 2 * math.pi))
                      + rng.uniform(0.0, 0.03) * np.sin(2 * math.pi * rng.uniform(3, 6) * xs / size
                                                        + rng.uniform(0, 2 * math.pi)))
    sky = ys < horizon  # [S, S]
    depth = ys / size  # 0 at the top, 1 at the bottom

    sky_top = rng.uniform([0.05, 0.20, 0.50], [0.25, 0.45, 0.85])
    sky_low = np.clip(sky_top + rng.uniform(0.2, 0.4), 0, 1)
    clouds = np.clip(_smooth_noise(rng, size, 4), 0, 1)[..., None] * rng.uniform(0.2, 0.5)
    sky_rgb = sky_top + (sky_low - sky_top) * depth[..., None] + clouds

    ground_palette = np.array([[0.20, 0.45, 0.12], [0.42, 0.30, 0.16], [0.62, 0.55, 0.33], [0.30, 0.32, 0.30]])
    ground_far = ground_palette[rng.integers(len(ground_palette))] + rng.uniform(-0.06, 0.06, 3)
    ground_near = ground_far * rng.uniform(0.55, 0.8)
    texture = 0.08 * _smooth_noise(rng, size, 16)[..., None] + 0.05 * rng.uniform(-1, 1, (size, 1, 1))
    ground_rgb = ground_far + (ground_near - ground_far) * depth[..., None] + texture

    rgb = np.where(sky[..., None], sky_rgb, ground_rgb)
    return np.clip(rgb, 0, 1), sky


def _pick_colour(rng, background_colour: np.ndarray) -> np.ndarray:
    """A saturated RGB colour far from the background behind the shape (best of a few draws)."""
    best, best_distance = None, -1.0
    for _ in range(20):
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.75, 1), rng.uniform(0.75, 1)
        colour = _hsv_to_rgb(hue, saturation, value)
        distance = float(np.linalg.norm(colour - background_colour))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= MIN_COLOUR_DISTANCE:
            break
    return best


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1)


# ---------------------------------------------------------------- one image


def _draw_candidates(rng, size: int, with_crowd: bool) -> list[dict]:
    """Shapes in painting order (bottom first), each with its polygons and full mask."""
    candidates = []
    num_instances = int(rng.integers(1, MAX_INSTANCES + 1))
    if rng.uniform() < LARGE_PROBABILITY:
        num_instances = min(num_instances, 3)
        sizes = [rng.uniform(*LARGE_SIZE_RANGE)] + [rng.uniform(*SIZE_RANGE) for _ in range(num_instances - 1)]
    else:
        sizes = [rng.uniform(*SIZE_RANGE) for _ in range(num_instances)]
    for relative_size in sizes:
        category_id = int(rng.integers(1, len(THING_NAMES) + 1))
        polygon = _place_polygon(rng, category_id, relative_size * size, size)
        candidates.append({"category_id": category_id, "polygons": [polygon], "iscrowd": 0})
    if with_crowd:  # a cluster of tiny shapes of one class, painted on top
        category_id = int(rng.integers(1, len(THING_NAMES) + 1))
        centre = rng.uniform(0.2 * size, 0.8 * size, 2)
        polygons = []
        for _ in range(int(rng.integers(*CROWD_MEMBERS))):
            offset = rng.uniform(-0.12 * size, 0.12 * size, 2)
            member_size = rng.uniform(0.04, 0.07) * size
            polygons.append(_place_polygon(rng, category_id, member_size, size, centre=centre + offset))
        candidates.append({"category_id": category_id, "polygons": polygons, "iscrowd": 1})
    for shape in candidates:
        masks = [rasterize_polygon(p, size, size) for p in shape["polygons"]]
        shape["full_mask"] = np.bitwise_or.reduce(masks).astype(bool)
    return candidates


def _keep_visible(candidates: list[dict]) -> list[dict]:
    """Top-down pass: keep shapes that stay visible enough under the *kept* shapes above."""
    covered = np.zeros_like(candidates[0]["full_mask"])
    kept = []
    for shape in reversed(candidates):
        visible = shape["full_mask"] & ~covered
        num_visible, num_full = int(visible.sum()), int(shape["full_mask"].sum())
        if num_visible < MIN_VISIBLE_PIXELS or num_visible < MIN_VISIBLE_FRACTION * num_full:
            continue  # never painted, so it occludes nothing
        shape["visible_mask"] = visible
        covered |= shape["full_mask"]
        kept.append(shape)
    return kept[::-1]  # back to painting order


def _segmentation(shape: dict) -> dict | list:
    visible = shape["visible_mask"]
    if shape["iscrowd"]:
        return uncompressed_rle(visible)
    if np.array_equal(visible, shape["full_mask"]):
        return shape["polygons"]  # unoccluded: the polygon itself is the exact mask
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}


def segment_id(index: int) -> int:
    """Panoptic segment id of the index-th segment (1-based) of an image; never 0 (void)."""
    return (index * SEGMENT_ID_MULTIPLIER) % (1 << 24)


# The COCO panoptic codec (id = R + 256 G + 256^2 B) lives with the panoptic evaluation;
# these names stay for the notebooks and tests that use them.
ids_to_rgb = id_to_rgb
rgb_to_ids = rgb_to_id


def render_image(seed: int, split: str, index: int, size: int) -> dict:
    """Draw one image: RGB uint8 [S, S, 3], its kept shapes, panoptic ids [S, S] and segments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    with_crowd = split == "val" and index % CROWD_EVERY == 1
    rgb, sky = _draw_background(rng, size)
    shapes = _keep_visible(_draw_candidates(rng, size, with_crowd))
    for shape in shapes:  # bottom first: later shapes paint over earlier ones
        mask = shape["full_mask"]
        colour = _pick_colour(rng, rgb[mask].mean(axis=0))
        rgb[mask] = np.clip(colour + rng.uniform(-0.03, 0.03, 3), 0, 1)
    rgb = rgb + rng.normal(0, rng.uniform(0.01, 0.035), rgb.shape)
    pixels = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)

    panoptic = np.zeros((size, size), dtype=np.int64)
    segments = []
    things = np.zeros((size, size), dtype=bool)
    for shape in shapes:
        things |= shape["visible_mask"]
    regions = [(s["visible_mask"], s["category_id"], s["iscrowd"]) for s in shapes]
    regions += [(sky & ~things, SKY_ID, 0), (~sky & ~things, GROUND_ID, 0)]
    for mask, category_id, iscrowd in regions:
        if not mask.any():
            continue
        seg_id = segment_id(len(segments) + 1)
        panoptic[mask] = seg_id
        segments.append({"id": seg_id, "category_id": category_id, "area": int(mask.sum()),
                         "bbox": mask_bbox(mask), "iscrowd": iscrowd})
    return {"pixels": pixels, "shapes": shapes, "panoptic": panoptic, "segments": segments}


def _write_image(job: tuple) -> tuple[list[dict], list[dict]]:
    """Render and write one image; returns (annotations without ids, panoptic segments)."""
    out_dir, seed, split, index, size = job
    image_id = index + 1
    drawn = render_image(seed, split, index, size)
    name = f"{split}_{image_id:06d}.png"
    Image.fromarray(drawn["pixels"]).save(out_dir / "images" / name, compress_level=PNG_COMPRESS_LEVEL)
    Image.fromarray(ids_to_rgb(drawn["panoptic"])).save(out_dir / "panoptic" / split / name)
    annotations = [{"image_id": image_id, "category_id": s["category_id"],
                    "segmentation": _segmentation(s), "area": int(s["visible_mask"].sum()),
                    "bbox": mask_bbox(s["visible_mask"]), "iscrowd": s["iscrowd"]}
                   for s in drawn["shapes"]]
    return annotations, drawn["segments"]


# ---------------------------------------------------------------- the dataset


def _write_split(out_dir: Path, split: str, num_images: int, size: int, seed: int, pool) -> None:
    jobs = [(out_dir, seed, split, index, size) for index in range(num_images)]
    results = pool.map(_write_image, jobs, chunksize=32) if pool else map(_write_image, jobs)
    info = {"description": "minimrcnn synthetic shapes", "version": "1.0",
            "minimrcnn_shapes": {"split": split, "num_images": num_images, "image_size": size, "seed": seed,
                                 "version": FORMAT_VERSION}}
    images, annotations, panoptic_annotations = [], [], []
    for index, (image_annotations, segments) in enumerate(results):
        image_id = index + 1
        name = f"{split}_{image_id:06d}.png"
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, **annotation})
        panoptic_annotations.append({"image_id": image_id, "file_name": name, "segments_info": segments})
    licenses = [{"id": 1, "name": "CC0 (synthetic)", "url": ""}]
    things = [{k: c[k] for k in ("id", "name", "supercategory")} for c in SHAPES_CATEGORIES if c["isthing"]]
    instances = {"info": info, "licenses": licenses, "images": images,
                 "annotations": annotations, "categories": things}
    panoptic = {"info": info, "licenses": licenses, "images": images,
                "annotations": panoptic_annotations, "categories": SHAPES_CATEGORIES}
    for kind, content in (("instances", instances), ("panoptic", panoptic)):
        (out_dir / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(content, separators=(",", ":")))


def generate_shapes(out_dir, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL, image_size: int = IMAGE_SIZE,
                    seed: int = SEED, num_workers: int | None = None) -> Path:
    """Generate the shapes dataset into ``out_dir`` (replacing a previous shapes set there).

    The set is written to a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half dataset. Returns ``out_dir`` as a Path.
    """
    for name, value, low in (("num_train", num_train, 0), ("num_val", num_val, 0), ("image_size", image_size, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not _is_shapes_set(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a shapes dataset; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("images", "annotations", "panoptic/train", "panoptic/val"):
        (staging / sub).mkdir(parents=True)
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1) if num_train + num_val >= 200 else 0
    try:
        if num_workers > 1:
            with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(num_workers) as pool:
                _write_split(staging, "train", num_train, image_size, seed, pool)
                _write_split(staging, "val", num_val, image_size, seed, pool)
        else:
            _write_split(staging, "train", num_train, image_size, seed, None)
            _write_split(staging, "val", num_val, image_size, seed, None)
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(retired)
            staging.rename(out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _is_shapes_set(root: Path) -> bool:
    return all((root / "annotations" / f"{kind}_{split}.json").is_file()
               for kind in ("instances", "panoptic") for split in SPLITS)


def recorded_settings(root: Path, split: str) -> dict | None:
    """The settings a split was generated with (its ``info.minimrcnn_shapes``), or None."""
    try:
        info = json.loads((root / "annotations" / f"instances_{split}.json").read_text())["info"]
        return info["minimrcnn_shapes"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_shapes(root="data/shapes", **kwargs) -> Path:
    """Return ``root``, generating the shapes set there first if it is absent.

    Keyword arguments go to :func:`generate_shapes`. A set already at ``root`` is reused
    unless it was generated with different settings than those passed here.
    """
    root = Path(root)
    if _is_shapes_set(root):
        settings = {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "image_size": IMAGE_SIZE, "seed": SEED}
        settings.update({k: v for k, v in kwargs.items() if k in settings})
        recorded = {split: recorded_settings(root, split) for split in SPLITS}
        if all(recorded.values()) and (
                recorded["train"]["num_images"] == settings["num_train"]
                and recorded["val"]["num_images"] == settings["num_val"]
                and all(recorded[s]["image_size"] == settings["image_size"] for s in SPLITS)
                and all(recorded[s]["seed"] == settings["seed"] for s in SPLITS)
                and all(recorded[s].get("version") == FORMAT_VERSION for s in SPLITS)):
            return root
    return generate_shapes(root, **kwargs)
