"""The command line: train two iterations on the tiny shapes set, then draw predictions."""

import json

import pytest
from PIL import Image

from minimrcnn.cli import main
from minimrcnn.engine.checkpoint import load_checkpoint

TINY_OVERRIDES = {
    "base": "shapes-cpu", "min_size": [64], "min_size_test": 64, "max_size": 64, "norm": "gn", "backbone_width": 8, "fpn_channels": 16, "box_head_dim": 32,
    "mask_head_dim": 8, "mask_head_num_convs": 1, "roi_batch_size_per_image": 16,
    "rpn_batch_size_per_image": 32, "rpn_pre_nms_topk_train": 100, "rpn_post_nms_topk_train": 20,
    "rpn_pre_nms_topk_test": 50, "rpn_post_nms_topk_test": 10, "detections_per_image": 10,
    "batch_size": 2, "warmup_iters": 1, "base_lr": 0.01,
}


# Tiny models gain nothing from a second thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_then_predict(tmp_path, tiny_shapes, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(TINY_OVERRIDES))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--out", str(run_dir), "--data", str(tiny_shapes),
                 "--max-iter", "2", "--device", "cpu"]) == 0
    assert "segm" in capsys.readouterr().out  # the AP table
    saved = load_checkpoint(run_dir / "last.pth")
    assert saved["iteration"] == saved["max_iter"] == 2
    assert saved["config"]["name"] == "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and set(metrics) >= {"bbox", "segm", "train_seconds", "device"}

    # --resume without --config continues with the checkpoint's own config (here: already finished).
    assert main(["train", "--out", str(run_dir), "--data", str(tiny_shapes), "--resume", "--no-eval"]) == 0
    assert load_checkpoint(run_dir / "last.pth")["iteration"] == 2

    images = sorted((tiny_shapes / "images").glob("val_*.png"))[:2]
    out_dir = tmp_path / "pictures"
    assert main(["predict", "--checkpoint", str(run_dir / "model_final.pth"), *map(str, images),
                 "--out", str(out_dir), "--score-thresh", "0.0"]) == 0
    for image in images:
        picture = out_dir / f"{image.stem}.png"
        with Image.open(picture) as drawn:
            assert drawn.size[0] >= 128 and drawn.mode in ("RGB", "RGBA")
