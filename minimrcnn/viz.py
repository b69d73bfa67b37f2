"""Pictures with matplotlib: instances (boxes, class names, scores, translucent masks),
panoptic maps, stable colours, and ``describe`` for printing what an array holds.

Every drawing function takes a matplotlib ``Axes`` and returns the artists it added, so
callers can restyle or remove them.
"""

from __future__ import annotations

import colorsys

import numpy as np

from minimrcnn.evaluation.coco import to_numpy

GOLDEN_RATIO_CONJUGATE = 0.618033988749895  # hue step that keeps successive colours far apart
MASK_ALPHA = 0.45


def colour_for(index: int) -> tuple[float, float, float]:
    """A saturated RGB colour in [0, 1] for an integer index; the same index gives the same colour."""
    hue = (int(index) * GOLDEN_RATIO_CONJUGATE) % 1.0
    lightness = (0.45, 0.55, 0.62)[int(index) % 3]
    return colorsys.hls_to_rgb(hue, lightness, 0.85)


def _image_hwc(image) -> np.ndarray:
    """[3, H, W] or [H, W, 3] (float in [0, 1] or uint8) -> [H, W, 3] for imshow."""
    image = to_numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.transpose(1, 2, 0)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 1)
    return image


def draw_instances(ax, image, boxes=None, labels=None, scores=None, masks=None, class_names=None,
                   score_thresh: float = 0.0):
    """Draw an image with its instances.

    Args:
        image: [3, H, W] or [H, W, 3], float in [0, 1] or uint8 (tensor or array).
        boxes: [D, 4] xyxy; labels: [D] ints; scores: [D] floats (instances below
            ``score_thresh`` are skipped); masks: [D, H, W] (bool, uint8 or probabilities >= 0.5).
        class_names: label -> name (index 0 is the background), for the captions.
    Returns:
        list of the matplotlib artists added (image, mask overlay, rectangles, texts).
    """
    from matplotlib.patches import Rectangle

    picture = _image_hwc(image)
    height, width = picture.shape[:2]
    artists = [ax.imshow(picture)]
    counts = [len(to_numpy(a)) for a in (boxes, labels, scores, masks) if a is not None]
    if counts and len(set(counts)) != 1:
        raise ValueError(f"boxes, labels, scores and masks must describe the same instances, got lengths {counts}")
    num_instances = counts[0] if counts else 0
    keep = np.arange(num_instances)
    if scores is not None:
        keep = keep[to_numpy(scores)[keep] >= score_thresh]

    colours = [colour_for(int(to_numpy(labels)[i]) if labels is not None else i) for i in keep]
    if masks is not None and len(keep):
        overlay = np.zeros((height, width, 4), dtype=np.float32)  # one RGBA layer for all masks
        masks_np = to_numpy(masks)
        for colour, i in zip(colours, keep):
            inside = masks_np[i] >= 0.5 if masks_np.dtype.kind == "f" else masks_np[i].astype(bool)
            overlay[inside] = (*colour, MASK_ALPHA)
        artists.append(ax.imshow(overlay))
    if boxes is not None:
        boxes_np = to_numpy(boxes)
        for colour, i in zip(colours, keep):
            x1, y1, x2, y2 = (float(v) for v in boxes_np[i])
            artists.append(ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                                  edgecolor=colour, linewidth=1.5)))
    for colour, i in zip(colours, keep):
        caption = []
        if labels is not None:
            label = int(to_numpy(labels)[i])
            caption.append(class_names[label] if class_names is not None else str(label))
        if scores is not None:
            caption.append(f"{float(to_numpy(scores)[i]):.2f}")
        if caption and boxes is not None:
            x1, y1 = (float(v) for v in to_numpy(boxes)[i][:2])
            artists.append(ax.text(x1, y1, " ".join(caption), fontsize=7, color="white", va="bottom",
                                   bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"}))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    return artists


def draw_panoptic(ax, panoptic_ids, segments_info, categories):
    """Draw a panoptic map: each segment in its own colour, captioned with its category.

    Args:
        panoptic_ids: [H, W] segment ids (0 is void, drawn black).
        segments_info: dicts with "id" and "category_id" (COCO panoptic ``segments_info``).
        categories: COCO panoptic categories (dicts with "id", "name", "isthing").
    Returns:
        list of the matplotlib artists added.
    """
    ids = to_numpy(panoptic_ids)
    if ids.ndim != 2:
        raise ValueError(f"panoptic_ids: expected [H, W], got shape {ids.shape}")
    category_of = {c["id"]: c for c in categories}
    picture = np.zeros((*ids.shape, 3), dtype=np.float32)
    placements = []
    for number, segment in enumerate(segments_info):
        category = category_of.get(segment["category_id"])
        if category is None:
            raise ValueError(f"segments_info: segment {segment['id']} has unknown category {segment['category_id']}")
        inside = ids == segment["id"]
        if not inside.any():
            continue
        # Stuff keeps one muted colour per category; things get one colour per segment.
        colour = colour_for(number + 1) if category.get("isthing", 1) else \
            tuple(0.35 + 0.4 * np.array(colour_for(1000 + category["id"])))
        picture[inside] = colour
        rows, cols = np.nonzero(inside)
        middle = len(rows) // 2  # a pixel of the segment itself, near its middle row
        order = np.argsort(rows, kind="stable")
        placements.append((cols[order[middle]], rows[order[middle]], category["name"]))
    artists = [ax.imshow(picture)]
    for x, y, name in placements:
        artists.append(ax.text(x, y, name, fontsize=7, ha="center", va="center", color="white",
                               bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"}))
    ax.set_axis_off()
    return artists


def describe(name: str, array) -> str:
    """Print and return a one-line summary: name, shape, dtype, min, max (handy in notebooks)."""
    dtype = str(getattr(array, "dtype", None) or np.asarray(array).dtype)  # torch.float32 or float32
    values = to_numpy(array)
    if values.size:
        numbers = values.astype(np.float64)
        low, high = f"{numbers.min():.4g}", f"{numbers.max():.4g}"
    else:
        low = high = "-"
    line = f"{name:<24} shape {str(tuple(values.shape)):<18} {dtype:<13} min {low:>9}  max {high:>9}"
    print(line)
    return line


def draw_confusion_matrix(axes, matrix, class_names, title: str | None = None):
    """Counts [K + 1, K + 1] (rows: true class + "background", columns: predicted + "missed"),
    each row shaded by its share so that rare classes read as clearly as common ones."""
    counts = to_numpy(matrix)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    rows = list(class_names) + ["background"]
    columns = list(class_names) + ["missed"]
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            axes.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                      color="white" if shares[i, j] > 0.5 else "black")
    if title:
        axes.set_title(title, fontsize=9)
    return axes


def draw_boxes(ax, boxes, colours=None, linewidth: float = 1.0, linestyle: str = "-", alpha: float = 1.0):
    """Outline boxes on an existing Axes (anchors, proposals, RoIs), with no image or captions.

    boxes: [N, 4] xyxy (tensor or array); colours: one colour for all, or one per box
    (default: ``colour_for(i)``). Returns the rectangles added.
    """
    from matplotlib.patches import Rectangle

    boxes_np = np.asarray(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes).reshape(-1, 4)
    if colours is None:
        colours = [colour_for(i) for i in range(len(boxes_np))]
    elif isinstance(colours, str) or (len(colours) in (3, 4) and all(isinstance(c, (int, float)) for c in colours)):
        # one colour for all: a name, or an RGB(A) tuple of numbers
        colours = [colours] * len(boxes_np)
    if len(colours) != len(boxes_np):
        raise ValueError(f"colours: expected one per box ({len(boxes_np)}), got {len(colours)}")
    return [ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                   linewidth=linewidth, linestyle=linestyle, alpha=alpha))
            for (x1, y1, x2, y2), colour in zip(boxes_np.tolist(), colours)]


def draw_roi_pool_vs_align(ax_pool, ax_align, feature_map, roi, output_size, sampling_ratio,
                           spatial_scale: float = 1.0):
    """Notebook 01's picture: RoIPool's quantized bins (left) and RoIAlign's sample points (right).

    feature_map: [H, W]; roi: (batch_index, x1, y1, x2, y2) in image coordinates. Drawn in
    imshow's coordinates, where feature cell (r, c) is centred on (c, r): that is the
    ``aligned=True`` convention, so the box is shifted by half a cell and the sample points
    need no shift. Returns the artists added.
    """
    from matplotlib.patches import Rectangle

    from minimrcnn.ops.roi_align import roi_align_sample_points
    from minimrcnn.ops.roi_pool import roi_pool_bins

    feature_map = np.asarray(feature_map.detach().cpu() if hasattr(feature_map, "detach") else feature_map)
    height, width = feature_map.shape
    roi = [float(v) for v in roi][:5]
    _, x1, y1, x2, y2 = roi
    s = spatial_scale
    artists = []
    for ax, title in ((ax_pool, "RoIPool: quantized bins"), (ax_align, "RoIAlign: sample points")):
        artists.append(ax.imshow(feature_map, cmap="viridis"))
        artists.append(ax.add_patch(Rectangle((x1 * s - 0.5, y1 * s - 0.5), (x2 - x1) * s, (y2 - y1) * s,
                                              fill=False, ec="red", lw=2)))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    for _, _, r0, r1, c0, c1 in roi_pool_bins(roi, height, width, output_size, spatial_scale):
        artists.append(ax_pool.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False,
                                                   ec="white", lw=1, ls="--")))
    points = roi_align_sample_points(roi, output_size, spatial_scale, sampling_ratio, aligned=True)
    artists += ax_align.plot(points[..., 1].ravel(), points[..., 0].ravel(), "w.", ms=4)
    return artists


# Outcome colours of evaluation.failures: greens for what went right, warm colours for errors.
FAILURE_COLOURS = {
    "good": "limegreen", "correct": "limegreen", "poor_localization": "gold", "mislocalized": "gold",
    "wrong_class": "magenta", "duplicate": "deepskyblue", "missed": "red", "background": "darkorange",
}


def draw_failures(ax, image, objects, detections, names: dict | None = None):
    """Notebook 06's failure picture: an image with its objects (dashed) and detections (solid),
    each outlined in the colour of its outcome (``FAILURE_COLOURS``) and captioned unless it
    went right; the legend counts the outcomes shown.

    objects, detections: records of ``evaluation.failures.classify_failures`` for this image
    (boxes as COCO's [x, y, w, h]); names: category id -> name, for the captions.
    Returns the matplotlib artists added.
    """
    from matplotlib.lines import Line2D

    artists = [ax.imshow(_image_hwc(image))]
    shown: dict = {}
    for records, linestyle in ((objects, "--"), (detections, "-")):
        for record in records:
            outcome = record["outcome"]
            if outcome not in FAILURE_COLOURS:
                raise ValueError(f"outcome: expected one of {sorted(FAILURE_COLOURS)}, got {outcome!r}")
            colour = FAILURE_COLOURS[outcome]
            x, y, w, h = (float(v) for v in record["bbox"])
            artists += draw_boxes(ax, [[x, y, x + w, y + h]], colour, linewidth=1.5, linestyle=linestyle)
            if outcome not in ("good", "correct"):
                name = names.get(record["category_id"], record["category_id"]) if names else record["category_id"]
                artists.append(ax.text(x, y + h if linestyle == "--" else y, f"{name}: {outcome}", fontsize=6,
                                       color="white", va="top" if linestyle == "--" else "bottom",
                                       bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "edgecolor": "none"}))
            key = (outcome, linestyle)
            shown[key] = shown.get(key, 0) + 1
    handles = [Line2D([], [], color=FAILURE_COLOURS[outcome], linestyle=linestyle,
                      label=f"{'object' if linestyle == '--' else 'detection'} {outcome}: {count}")
               for (outcome, linestyle), count in shown.items()]
    if handles:
        artists.append(ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0)))
    ax.set_axis_off()
    return artists
