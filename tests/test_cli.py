"""The command line: train two iterations on the tiny shapes set, then draw predictions."""

import json

import pytest
import torch
from PIL import Image

from minimrcnn.cli import main
from minimrcnn.engine import checkpoint as ckpt
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


def test_resume_continues_an_interrupted_run_exactly(tmp_path, tiny_shapes, monkeypatch):
    """Ctrl-C during iteration 3 of 4 (after the checkpoint at 2), then ``train --resume`` with
    nothing but --out: it continues at iteration 2 and ends with the uninterrupted run's weights."""
    from minimrcnn.modeling.model import MaskRCNN

    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps({**TINY_OVERRIDES, "checkpoint_period": 2}))
    arguments = ["--config", str(config_file), "--data", str(tiny_shapes), "--max-iter", "4", "--device", "cpu",
                 "--no-eval"]
    assert main(["train", "--out", str(tmp_path / "whole"), *arguments]) == 0

    calls = {"count": 0, "interrupt_at": 3}  # the third forward is iteration 2 (0-based)

    class InterruptedModel(MaskRCNN):
        def forward(self, images, targets=None):
            calls["count"] += 1
            if calls["count"] == calls["interrupt_at"]:
                raise KeyboardInterrupt
            return super().forward(images, targets)

    monkeypatch.setattr(ckpt, "build_model", InterruptedModel)
    split = tmp_path / "split"
    try:
        code = main(["train", "--out", str(split), *arguments])
    except (KeyboardInterrupt, SystemExit):
        code = None
    assert code != 0  # an interrupted run does not report success
    assert load_checkpoint(split / "last.pth")["iteration"] == 2
    assert not (split / "model_final.pth").exists()

    calls["interrupt_at"] = None
    assert main(["train", "--out", str(split), "--data", str(tiny_shapes), "--resume", "--no-eval"]) == 0
    # 2 iterations, the interrupted one, then only the 2 left: it started from the checkpoint.
    assert calls["count"] == 2 + 1 + 2
    whole, resumed = load_checkpoint(tmp_path / "whole/last.pth"), load_checkpoint(split / "last.pth")
    assert resumed["iteration"] == whole["iteration"] == 4
    assert whole["model"].keys() == resumed["model"].keys()
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_ctrl_c_in_the_demo_prints_one_line_and_how_to_continue(tmp_path, monkeypatch, capsys):
    """Training interrupted inside the demo: no traceback, the iteration and the train command
    that continues the run, exit status 128 + SIGINT."""
    import signal

    from minimrcnn.engine import demo as demo_module
    from minimrcnn.engine.interrupts import TrainingInterrupted

    def interrupted_demo(args):
        raise TrainingInterrupted(41, signal.SIGINT)

    monkeypatch.setattr(demo_module, "run_demo", interrupted_demo)
    status = main(["demo", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert status == 130
    assert err.strip().splitlines() == [
        f"interrupted at iteration 41; continue with python -m minimrcnn train --out {tmp_path / 'demo'} --resume"]


@pytest.mark.parametrize("command", [["demo"], ["data", "shapes"]])
def test_ctrl_c_outside_training_prints_one_line(tmp_path, monkeypatch, capsys, command):
    """Ctrl-C while the demo evaluates or the shapes set is drawn: one line, status 130."""
    from minimrcnn.data import shapes as shapes_module
    from minimrcnn.engine import demo as demo_module

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_demo", ctrl_c)
    monkeypatch.setattr(shapes_module, "generate_shapes", ctrl_c)
    status = main(command + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 130
    assert err.strip().splitlines() == [f"{command[0]}: interrupted"]
