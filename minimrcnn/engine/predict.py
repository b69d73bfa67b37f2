"""Pictures of predictions: ``python -m minimrcnn predict --checkpoint C IMAGE... --out DIR``.

Each image is read as RGB, given to ``model.predict`` at its own size, and drawn with
``minimrcnn.viz.draw_instances`` (masks, boxes, class names and scores) into
``DIR/<image name>.png``; a model with a semantic head gets its panoptic map drawn beside
(``minimrcnn.viz.draw_panoptic``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minimrcnn.engine.checkpoint import load_checkpoint, load_model
from minimrcnn.engine.device import resolve_device

FIGURE_DPI = 100
INCHES_PER_PIXEL = 1 / 50  # a 128-pixel image becomes a 2.6-inch picture: captions stay legible
MIN_FIGURE_INCHES = 3.0


def read_image(path) -> torch.Tensor:
    """float32 [3, H, W] RGB in [0, 1] of an image file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as picture:
            pixels = np.array(picture.convert("RGB"))  # [H, W, 3] uint8
    except OSError as exc:
        raise ValueError(f"{path}: not an image PIL can read ({exc})") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


def class_names_of(checkpoint_path, num_classes: int) -> list[str]:
    """The class names stored at training time, or ``class_1``, ``class_2``, ... without them."""
    names = load_checkpoint(checkpoint_path).get("extra", {}).get("class_names")
    if names and len(names) == num_classes:
        return list(names)
    return ["__background__"] + [f"class_{label}" for label in range(1, num_classes)]


def panoptic_categories_of(checkpoint_path, config) -> list[dict]:
    """The model's panoptic categories (thing label l -> id l, stuff class s -> id K + s) with the
    names stored at training time, as ``viz.draw_panoptic`` wants them."""
    class_names = class_names_of(checkpoint_path, config.num_classes)
    stuff_names = load_checkpoint(checkpoint_path).get("extra", {}).get("stuff_names")
    if not stuff_names or len(stuff_names) != 1 + config.num_stuff_classes:
        stuff_names = ["things"] + [f"stuff_{s}" for s in range(1, 1 + config.num_stuff_classes)]
    num_things = config.num_classes - 1
    return ([{"id": label, "name": class_names[label], "isthing": 1} for label in range(1, config.num_classes)]
            + [{"id": num_things + s, "name": stuff_names[s], "isthing": 0}
               for s in range(1, 1 + config.num_stuff_classes)])


def draw_prediction(image: torch.Tensor, prediction: dict, class_names, path,
                    score_thresh: float = 0.5, title: str | None = None,
                    panoptic_categories: list[dict] | None = None) -> Path:
    """One picture of ``prediction`` over ``image`` ([3, H, W]) saved as a PNG at ``path``;
    with ``panoptic_categories`` and a ``panoptic_seg`` in the prediction, the panoptic map beside it."""
    from matplotlib.figure import Figure

    from minimrcnn.viz import draw_instances, draw_panoptic

    panels = 2 if panoptic_categories is not None and "panoptic_seg" in prediction else 1
    height, width = image.shape[-2:]
    size = (max(MIN_FIGURE_INCHES, width * INCHES_PER_PIXEL), max(MIN_FIGURE_INCHES, height * INCHES_PER_PIXEL))
    figure = Figure(figsize=(size[0] * panels, size[1]), dpi=FIGURE_DPI)
    axes = figure.add_axes((0, 0, 1 / panels, 0.93 if title else 1))
    draw_instances(axes, image, prediction["boxes"], prediction["labels"], prediction["scores"],
                   prediction["masks"], class_names=class_names, score_thresh=score_thresh)
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=8)
    if panels == 2:
        panoptic_axes = figure.add_axes((0.5, 0, 0.5, 0.93 if title else 1))
        draw_panoptic(panoptic_axes, prediction["panoptic_seg"], prediction["segments_info"], panoptic_categories)
        if title:
            panoptic_axes.set_title("panoptic", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def predict_images(checkpoint, image_paths, out_dir, device=None, score_thresh: float = 0.5) -> list[Path]:
    """Draw the predictions of ``checkpoint`` on every image; returns the written PNG paths."""
    device = resolve_device(device)
    model, config = load_model(checkpoint, device)
    class_names = class_names_of(checkpoint, config.num_classes)
    panoptic_categories = panoptic_categories_of(checkpoint, config) if config.semantic_head else None
    out_dir = Path(out_dir)
    written = []
    for image_path in image_paths:
        image = read_image(image_path)
        prediction = {k: v.cpu() if torch.is_tensor(v) else v
                      for k, v in model.predict([image.to(device)])[0].items()}
        kept = int((prediction["scores"] >= score_thresh).sum())
        written.append(draw_prediction(image, prediction, class_names,
                                       out_dir / f"{Path(image_path).stem}.png", score_thresh,
                                       title=f"{Path(image_path).name}: {kept} instances",
                                       panoptic_categories=panoptic_categories))
    return written


def predict_from_args(args) -> list[Path]:
    """``python -m minimrcnn predict --checkpoint C IMAGE... [--out DIR] [--score-thresh S]``."""
    written = predict_images(args.checkpoint, args.images, args.out, args.device, args.score_thresh)
    for path in written:
        print(path)
    return written
