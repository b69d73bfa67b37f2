"""Training on one's own COCO data: classes come from the data, files are checked up front.

The cases a new user meets: a set with more categories than the preset, a JSON config
that fixes another ``num_classes``, train and val that disagree on categories, an image
that the annotations list but the disk lacks or holds at another size.
"""

import json
import shutil

import pytest
import torch
from PIL import Image

from minimrcnn.cli import main
from minimrcnn.data import CocoInstances, ImageFilesError
from minimrcnn.engine import checkpoint as ckpt
from minimrcnn.engine import train as train_module
from test_train import StandInModel, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

EXTRA_CATEGORIES = [{"id": 11, "name": "pentagon"}, {"id": 12, "name": "ellipse"}]


def six_category_set(tiny_shapes, root, val_categories=None):
    """A copy of tiny_shapes' annotations with 6 categories (two new ones in use), sharing its images."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val"):
        data = json.loads((tiny_shapes / "annotations" / f"instances_{split}.json").read_text())
        data["categories"] = data["categories"] + EXTRA_CATEGORIES
        if split == "val" and val_categories is not None:
            data["categories"] = val_categories(data["categories"])
        listed = {c["id"] for c in data["categories"]}
        for index, annotation in enumerate(data["annotations"]):  # some objects become the new classes
            if index % 3 == 1 and EXTRA_CATEGORIES[index % 2]["id"] in listed:
                annotation["category_id"] = EXTRA_CATEGORIES[index % 2]["id"]
        paths[split] = root / f"{split}.json"
        paths[split].write_text(json.dumps(data))
    return paths


def train_args(tiny_shapes, paths, out, *extra):
    return ["train", "--out", str(out), "--train-images", str(tiny_shapes / "images"),
            "--train-annotations", str(paths["train"]), "--val-images", str(tiny_shapes / "images"),
            "--val-annotations", str(paths["val"]), "--device", "cpu", *extra]


def test_preset_adapts_to_the_data_and_names_travel(tmp_path, tiny_shapes, capsys):
    """The reported case: shapes-cpu on 6 categories used to die in the first step with
    'label 6 of object 0 is out of range 1..4'. Now it trains a 7-class model (the real one)."""
    paths = six_category_set(tiny_shapes, tmp_path / "six")
    config = tiny_config(max_iter=1, batch_size=2)
    assert config.num_classes == 5
    train_module.train(config, tmp_path / "run", train_images=tiny_shapes / "images",
                       train_annotations=paths["train"], progress=False, evaluate=False)
    assert "7 classes from train annotations (6 categories + background)" in capsys.readouterr().out
    saved = ckpt.load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert saved["config"]["num_classes"] == 7
    categories = sorted(json.loads(paths["train"].read_text())["categories"], key=lambda c: c["id"])
    assert saved["extra"]["class_names"] == ["__background__"] + [c["name"] for c in categories]
    assert saved["extra"]["class_names"][-2:] == ["pentagon", "ellipse"]
    assert saved["extra"]["category_ids"] == [0, 1, 2, 3, 4, 11, 12]
    # The classifier scores 7 classes: background + 6 (one row of class logits each).
    assert any(name.startswith("roi_heads.box_head") and tensor.shape[0] == 7
               for name, tensor in saved["model"].items())


def test_matching_preset_prints_nothing(tmp_path, tiny_shapes, capsys, monkeypatch):
    monkeypatch.setattr(ckpt, "build_model", StandInModel)
    train_module.train(tiny_config(max_iter=1), tmp_path / "run", data_root=tiny_shapes, progress=False,
                       evaluate=False)
    assert "classes from train annotations" not in capsys.readouterr().out


def test_json_config_fixing_num_classes_is_an_error(tmp_path, tiny_shapes):
    paths = six_category_set(tiny_shapes, tmp_path / "six")
    config_file = tmp_path / "mine.json"
    config_file.write_text(json.dumps({"base": "shapes-cpu", "num_classes": 5}))
    with pytest.raises(ValueError) as error:
        main(train_args(tiny_shapes, paths, tmp_path / "run", "--config", str(config_file)))
    message = str(error.value)
    assert "num_classes is 5" in message and "num_classes\": 7" in message and str(config_file) in message
    assert not (tmp_path / "run" / "last.pth").exists()


def test_json_config_without_num_classes_adapts(tmp_path, tiny_shapes, monkeypatch, capsys):
    monkeypatch.setattr(ckpt, "build_model", StandInModel)
    paths = six_category_set(tiny_shapes, tmp_path / "six")
    config_file = tmp_path / "mine.json"
    config_file.write_text(json.dumps({"base": "shapes-cpu", "max_iter": 1, "batch_size": 2,
                                       "num_workers": 0}))
    assert main(train_args(tiny_shapes, paths, tmp_path / "run", "--config", str(config_file), "--no-eval")) == 0
    assert "7 classes from train annotations" in capsys.readouterr().out
    assert ckpt.load_checkpoint(tmp_path / "run" / "last.pth")["config"]["num_classes"] == 7


def test_train_and_val_must_agree_on_categories(tmp_path, tiny_shapes):
    def renamed_and_missing(categories):
        kept = [dict(c) for c in categories if c["id"] != 12]
        kept[0]["name"] = "disc"
        return kept + [{"id": 13, "name": "hexagon"}]

    paths = six_category_set(tiny_shapes, tmp_path / "six", val_categories=renamed_and_missing)
    with pytest.raises(ValueError) as error:
        train_module.train(tiny_config(max_iter=1), tmp_path / "run", train_images=tiny_shapes / "images",
                           train_annotations=paths["train"], val_images=tiny_shapes / "images",
                           val_annotations=paths["val"], progress=False)
    message = str(error.value)
    assert "ids only in train annotations" in message and "[12]" in message
    assert "ids only in val annotations" in message and "[13]" in message
    assert "1 ('square' vs 'disc')" in message


# ------------------------------------------------------------------ up-front file checks


def broken_copy(tiny_shapes, root, missing=2, resized=1):
    """tiny_shapes' train split with ``missing`` image files deleted and ``resized`` ones resized."""
    shutil.copytree(tiny_shapes / "images", root / "images")
    data = json.loads((tiny_shapes / "annotations" / "instances_train.json").read_text())
    names = [image["file_name"] for image in data["images"]]
    for name in names[-missing:] if missing else []:
        (root / "images" / name).unlink()
    for name in names[:resized]:
        with Image.open(root / "images" / name) as picture:
            picture.resize((64, 64)).save(root / "images" / name)
    return root / "images", tiny_shapes / "annotations" / "instances_train.json", names


def test_all_file_problems_reported_at_once(tmp_path, tiny_shapes):
    images, annotations, names = broken_copy(tiny_shapes, tmp_path, missing=2, resized=1)
    dataset = CocoInstances(images, annotations)
    with pytest.raises(ImageFilesError) as error:
        dataset.check_image_files()
    message = str(error.value)
    assert f"3 of {len(names)} listed image files" in message and str(annotations) in message
    assert f"{names[-1]}: missing" in message and f"{names[-2]}: missing" in message
    assert f"{names[0]}: 64x64 pixels, listed as 128x128" in message


def test_long_lists_are_cut_with_a_count(tmp_path, tiny_shapes):
    images, annotations, names = broken_copy(tiny_shapes, tmp_path, missing=9, resized=0)
    with pytest.raises(ImageFilesError, match=r"9 of 16 .*; and 4 more$"):
        CocoInstances(images, annotations).check_image_files()


def test_training_stops_before_the_first_iteration(tmp_path, tiny_shapes, monkeypatch):
    """The reported case: a 3-iteration run used to finish without noticing a missing file."""
    calls = []

    class Counting(StandInModel):
        def forward(self, images, targets):
            calls.append(1)
            return super().forward(images, targets)

    monkeypatch.setattr(ckpt, "build_model", Counting)
    images, annotations, _ = broken_copy(tiny_shapes, tmp_path, missing=1, resized=0)
    with pytest.raises(ImageFilesError, match="1 of 16"):
        train_module.train(tiny_config(max_iter=3), tmp_path / "run", train_images=images,
                           train_annotations=annotations, progress=False, evaluate=False)
    assert calls == [] and not (tmp_path / "run" / "last.pth").exists()
