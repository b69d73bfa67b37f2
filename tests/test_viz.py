"""viz: drawing works on tensors and arrays and returns its artists; colours are stable."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minimrcnn.data import CocoInstances  # noqa: E402
from minimrcnn.data.shapes import rgb_to_ids  # noqa: E402
from minimrcnn.viz import colour_for, describe, draw_instances, draw_panoptic  # noqa: E402


@pytest.fixture
def ax():
    figure, axes = plt.subplots(figsize=(2, 2))
    yield axes
    plt.close(figure)


def test_colour_for_is_stable_and_distinct():
    colours = [colour_for(i) for i in range(12)]
    assert colours == [colour_for(i) for i in range(12)]
    assert len(set(colours)) == 12
    assert all(0 <= c <= 1 for colour in colours for c in colour)


def test_draw_instances_with_everything(tiny_shapes, ax):
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations" / "instances_val.json")
    image, target = dataset[1]
    count = len(target["labels"])
    scores = torch.linspace(0.1, 0.9, count)
    artists = draw_instances(ax, image, target["boxes"], target["labels"], scores, target["masks"],
                             class_names=dataset.class_names, score_thresh=0.5)
    kept = int((scores >= 0.5).sum())
    rectangles = [a for a in artists if isinstance(a, matplotlib.patches.Rectangle)]
    texts = [a for a in artists if isinstance(a, matplotlib.text.Text)]
    assert len(rectangles) == len(texts) == kept
    assert all(t.get_text().split()[0] in dataset.class_names[1:] for t in texts)
    assert len([a for a in artists if isinstance(a, matplotlib.image.AxesImage)]) == 2  # image + mask overlay
    ax.figure.canvas.draw()


def test_draw_instances_image_only_and_numpy(ax):
    artists = draw_instances(ax, np.zeros((8, 9, 3), dtype=np.uint8))
    assert len(artists) == 1
    artists = draw_instances(ax, torch.rand(3, 8, 9), boxes=torch.tensor([[1.0, 1.0, 5.0, 6.0]]),
                             labels=torch.tensor([2]), masks=torch.rand(1, 8, 9))  # mask probabilities
    assert len(artists) == 4  # image, overlay, rectangle, caption
    ax.figure.canvas.draw()


def test_draw_instances_rejects_mismatched_lengths(ax):
    with pytest.raises(ValueError, match="same instances"):
        draw_instances(ax, torch.rand(3, 8, 9), boxes=torch.zeros(2, 4), labels=torch.tensor([1]))


def test_draw_panoptic(tiny_shapes, ax):
    panoptic = json.loads((tiny_shapes / "annotations" / "panoptic_val.json").read_text())
    entry = panoptic["annotations"][0]
    ids = rgb_to_ids(np.array(Image.open(tiny_shapes / "panoptic" / "val" / entry["file_name"])))
    artists = draw_panoptic(ax, ids, entry["segments_info"], panoptic["categories"])
    names = {c["id"]: c["name"] for c in panoptic["categories"]}
    texts = [a.get_text() for a in artists if isinstance(a, matplotlib.text.Text)]
    assert sorted(texts) == sorted(names[s["category_id"]] for s in entry["segments_info"])
    ax.figure.canvas.draw()
    with pytest.raises(ValueError, match="panoptic_ids"):
        draw_panoptic(ax, ids[0], entry["segments_info"], panoptic["categories"])


def test_describe(capsys):
    line = describe("masks", torch.tensor([[0, 3]], dtype=torch.uint8))
    assert capsys.readouterr().out.strip() == line.strip()
    assert "masks" in line and "(1, 2)" in line and "torch.uint8" in line and "max         3" in line
    assert "min         -" in describe("empty", np.zeros((0, 4)))
