"""Shapes variants: other classes (hexagon, pentagon, ellipse), sizes and shading, from the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from minimrcnn.cli import main
from minimrcnn.data import CocoInstances
from minimrcnn.data import shapes


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    out = tmp_path_factory.mktemp("variant") / "hexagons"
    assert main(["data", "shapes", "--out", str(out), "--num-train", "12", "--num-val", "12",
                 "--classes", "square,circle,triangle,hexagon", "--size-range", "0.08", "0.47",
                 "--shading", "0.5"]) == 0
    return out


def test_variant_categories_and_stuff_ids(variant):
    instances = json.loads((variant / "annotations" / "instances_train.json").read_text())
    panoptic = json.loads((variant / "annotations" / "panoptic_train.json").read_text())
    assert [c["name"] for c in instances["categories"]] == ["square", "circle", "triangle", "hexagon"]
    assert [(c["id"], c["name"]) for c in panoptic["categories"][-2:]] == [(5, "sky"), (6, "ground")]
    assert {a["category_id"] for a in instances["annotations"]} <= {1, 2, 3, 4}
    assert instances["info"]["minimrcnn_shapes"]["variant"]["classes"][-1] == "hexagon"
    CocoInstances(variant / "images", variant / "annotations" / "instances_train.json").check_image_files()


def test_variant_files_are_what_render_image_draws(variant):
    settings = shapes.check_variant(("square", "circle", "triangle", "hexagon"), (0.08, 0.47), 0.5)
    drawn = shapes.render_image(0, "train", 3, 128, settings)
    with Image.open(variant / "images" / "train_000004.png") as picture:
        assert np.array_equal(np.asarray(picture), drawn["pixels"])


def test_hexagon_has_six_corners_and_ellipse_is_not_a_circle():
    hexagon = shapes._unit_polygon(4, ("square", "circle", "triangle", "hexagon"))
    assert hexagon.shape == (6, 2) and np.allclose(np.linalg.norm(hexagon, axis=1), 0.5)
    ellipse = shapes._unit_polygon(1, ("ellipse",))
    extent = ellipse.max(axis=0) - ellipse.min(axis=0)
    assert extent[1] / extent[0] == pytest.approx(shapes.ELLIPSE_AXIS_RATIO, rel=0.01)
    assert shapes._unit_polygon(1, ("pentagon",)).shape == (5, 2)


def test_shading_varies_pixels_inside_shapes():
    flat = shapes.check_variant(shapes.THING_NAMES, shapes.SIZE_RANGE, 0.0)
    shaded = shapes.check_variant(shapes.THING_NAMES, shapes.SIZE_RANGE, 0.8)

    def spread(variant_settings):
        values = []
        for index in range(6):
            drawn = shapes.render_image(0, "train", index, 128, variant_settings)
            for shape in drawn["shapes"]:
                values.append(drawn["pixels"][shape["visible_mask"]].astype(float).std(axis=0).mean())
        return np.mean(values)

    assert spread(shaded) > 2 * spread(flat)


def test_size_range_bounds_the_shapes(tmp_path):
    out = shapes.generate_shapes(tmp_path / "small", num_train=10, num_val=0, size_range=(0.1, 0.15))
    annotations = json.loads((out / "annotations" / "instances_train.json").read_text())["annotations"]
    regular = [a for a in annotations if a["bbox"][2] < 0.7 * 128]  # not the occasional large one
    assert regular and max(max(a["bbox"][2:]) for a in regular) <= 0.15 * 128 * 1.5  # rotation grows extent


@pytest.mark.parametrize("kwargs, field", [({"classes": ("square", "octagon")}, "classes"),
                                           ({"size_range": (0.5, 0.2)}, "size_range"),
                                           ({"shading": 2.0}, "shading")])
def test_bad_variant_options_are_named(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        shapes.generate_shapes(tmp_path / "bad", num_train=1, num_val=1, **kwargs)
