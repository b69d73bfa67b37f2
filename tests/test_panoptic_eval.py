"""Panoptic evaluation end to end: a tiny Panoptic FPN trained and scored on the tiny shapes
set, from ``train`` and from ``python -m minimrcnn evaluate``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from minimrcnn.cli import main
from minimrcnn.config import get_config
from minimrcnn.engine import train as train_module
from minimrcnn.engine.panoptic_eval import dataset_category_map, default_panoptic_paths
from minimrcnn.evaluation import panoptic_quality, read_panoptic_png

TINY_PANOPTIC = dict(min_size=(64,), min_size_test=64, max_size=64, norm="gn", backbone_width=8,
                     fpn_channels=16, semantic_channels=8, box_head_dim=32, mask_head_dim=8,
                     mask_head_num_convs=1, roi_batch_size_per_image=16, rpn_batch_size_per_image=32,
                     rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=20, rpn_pre_nms_topk_test=50,
                     rpn_post_nms_topk_test=10, detections_per_image=10, batch_size=4, max_iter=4,
                     warmup_iters=1, base_lr=0.01, checkpoint_period=4, num_workers=0, grad_clip=1.0,
                     panoptic_score_thresh=0.0)  # an untrained model scores low: place every instance


def test_default_panoptic_paths_follow_the_shapes_and_coco_layouts(tiny_shapes, tmp_path):
    assert default_panoptic_paths(tiny_shapes / "annotations/instances_val.json") == \
        (tiny_shapes / "annotations/panoptic_val.json", tiny_shapes / "panoptic/val")
    coco = tmp_path / "annotations/instances_val2017.json"
    assert default_panoptic_paths(coco) == (tmp_path / "annotations/panoptic_val2017.json",
                                            tmp_path / "annotations/panoptic_val2017")


def test_category_map_puts_stuff_after_things():
    assert dataset_category_map(3, [0, 7, 9], [None, 20, 30]) == {1: 7, 2: 9, 3: 20, 4: 30}


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    config = dataclasses.replace(get_config("shapes-cpu-panoptic"), **TINY_PANOPTIC)
    out = tmp_path_factory.mktemp("panoptic_run")
    summary = train_module.train(config, out, data_root=tiny_shapes, progress=False)
    return out, summary


def test_training_writes_panoptic_predictions_and_pq(trained, tiny_shapes, one_thread):
    out, summary = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss_semantic" in records[-1]
    assert set(summary["panoptic"]) == {"All", "Things", "Stuff"}
    for group in summary["panoptic"].values():
        assert 0.0 <= group["pq"] <= 1.0 and 0.0 <= group["sq"] <= 1.0 and 0.0 <= group["rq"] <= 1.0
    assert summary["panoptic"]["Stuff"]["n"] == 2  # sky and ground are always in the ground truth
    # The written files are valid COCO panoptic predictions of every val image, scored as reported.
    predictions = json.loads((out / "panoptic_predictions.json").read_text())
    gt = json.loads((tiny_shapes / "annotations/panoptic_val.json").read_text())
    assert sorted(a["image_id"] for a in predictions["annotations"]) == sorted(a["image_id"] for a in gt["annotations"])
    categories = {c["id"]: c for c in gt["categories"]}
    for annotation in predictions["annotations"]:
        ids = read_panoptic_png(out / "panoptic_predictions" / annotation["file_name"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in annotation["segments_info"]}
        for segment in annotation["segments_info"]:
            assert categories[segment["category_id"]]["isthing"] == segment["isthing"]
            assert segment["area"] == int((ids == segment["id"]).sum())
    result = panoptic_quality(str(tiny_shapes / "annotations/panoptic_val.json"), str(out / "panoptic_predictions.json"),
                              str(tiny_shapes / "panoptic/val"), str(out / "panoptic_predictions"))
    assert result["All"]["pq"] == pytest.approx(summary["panoptic"]["All"]["pq"])


def test_evaluate_command_prints_the_pq_table(trained, tiny_shapes, tmp_path, capsys, one_thread):
    out, summary = trained
    assert main(["evaluate", "--checkpoint", str(out / "model_final.pth"), "--images", str(tiny_shapes / "images"),
                 "--annotations", str(tiny_shapes / "annotations/instances_val.json"),
                 "--panoptic-annotations", str(tiny_shapes / "annotations/panoptic_val.json"),
                 "--panoptic-images", str(tiny_shapes / "panoptic/val"), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for row in ("All", "Things", "Stuff", "sky", "ground", "circle"):
        assert row in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["panoptic"]["All"]["pq"] == pytest.approx(summary["panoptic"]["All"]["pq"])
    assert (tmp_path / "panoptic_predictions.json").is_file()


def test_predict_draws_the_panoptic_map_beside_the_instances(trained, tiny_shapes, tmp_path, one_thread):
    from PIL import Image

    from minimrcnn.engine.predict import panoptic_categories_of

    out, _ = trained
    checkpoint = out / "model_final.pth"
    config = get_config("shapes-cpu-panoptic")
    names = [c["name"] for c in panoptic_categories_of(checkpoint, config)]
    assert names == ["square", "circle", "triangle", "star", "sky", "ground"]  # stored at training time
    image = tiny_shapes / "images/val_000001.png"
    plain_out, panoptic_out = tmp_path / "plain", tmp_path / "panoptic"
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(panoptic_out)]) == 0
    with Image.open(panoptic_out / "val_000001.png") as picture:
        width, height = picture.size
    assert width == 2 * height  # two square panels: instances | panoptic
