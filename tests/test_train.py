"""The training loop: seeded reproducibility, exact resume, NaN handling, outputs, time budgets."""

import contextlib
import dataclasses
import json

import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.engine import checkpoint as ckpt
from minimrcnn.engine import schedule
from minimrcnn.engine import train as train_module
from minimrcnn.engine.logging import LOSS_NAMES, read_metrics


class StandInModel(torch.nn.Module):
    """The MaskRCNN interface on a model small enough to train in milliseconds."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.head = torch.nn.Linear(4, len(LOSS_NAMES))

    def forward(self, images, targets):
        pooled = torch.cat([self.norm(self.conv(image[None])).mean(dim=(2, 3)) for image in images])  # [N, 4]
        outputs = self.head(pooled)  # [N, 5]
        # Depends on the (flipped) boxes and on the model's own random sampling, as Mask R-CNN does.
        goals = torch.stack([t["boxes"][:, 0].sum() / 100 + len(t["labels"]) for t in targets])  # [N]
        weights = 1 + 0.1 * torch.rand(len(LOSS_NAMES))
        losses = ((outputs - goals[:, None]) ** 2).mean(dim=0) * weights
        return dict(zip(LOSS_NAMES, losses))

    @torch.no_grad()
    def predict(self, images):
        predictions = []
        for image in images:
            height, width = image.shape[-2:]
            score = torch.sigmoid(self.head.bias[0])
            masks = torch.zeros(1, height, width, dtype=torch.bool)
            masks[:, height // 4: height // 2, width // 4: width // 2] = True
            predictions.append({"boxes": torch.tensor([[width / 4, height / 4, width / 2, height / 2]]),
                                "labels": torch.tensor([1]), "scores": score.reshape(1),
                                "masks": masks})
        return predictions


# Tiny models gain nothing from a second thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(ckpt, "build_model", StandInModel)


# A Mask R-CNN a few hundred kilobytes big, on images shrunk to 64 x 64 by the model itself:
# an iteration of 2 images takes a fraction of a second.
TINY_MODEL = dict(min_size=(64,), min_size_test=64, max_size=64, norm="gn", backbone_width=8, fpn_channels=16, box_head_dim=32, mask_head_dim=8,
                  mask_head_num_convs=1, roi_batch_size_per_image=16, rpn_batch_size_per_image=32,
                  rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=20, rpn_pre_nms_topk_test=50,
                  rpn_post_nms_topk_test=10, detections_per_image=10)


def tiny_config(**overrides):
    values = dict(batch_size=4, max_iter=6, warmup_iters=2, base_lr=0.01, checkpoint_period=3,
                  num_workers=0, grad_clip=1.0, **TINY_MODEL)
    values.update(overrides)
    return dataclasses.replace(get_config("shapes-cpu"), **values)


def run(config, out_dir, shapes, **kwargs):
    kwargs.setdefault("evaluate", False)
    return train_module.train(config, out_dir, data_root=shapes, progress=False, **kwargs)


def weights(path):
    return ckpt.load_checkpoint(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_shapes):
    # The real Mask R-CNN, BatchNorm included: RPN and RoI sampling draw from the seeded generator.
    config = tiny_config(max_iter=3, batch_size=2, norm="bn")
    run(config, tmp_path / "a", tiny_shapes)
    run(config, tmp_path / "b", tiny_shapes)
    run(dataclasses.replace(config, seed=1), tmp_path / "c", tiny_shapes)
    a, b, c = (weights(tmp_path / name / "model_final.pth") for name in "abc")
    assert_same_weights(a, b)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_shapes, monkeypatch):
    """The real model, 6 iterations of 2 micro-batches, against 3 + Ctrl-C + resume for 3 more."""
    from minimrcnn.modeling.model import MaskRCNN

    config = tiny_config(grad_accum_steps=2)
    run(config, tmp_path / "whole", tiny_shapes)

    calls = {"count": 0}

    class InterruptedModel(MaskRCNN):
        def forward(self, images, targets=None):
            calls["count"] += 1
            if calls["count"] == 9:  # iteration 4 (0-based), second micro-batch: after the checkpoint at 3
                raise KeyboardInterrupt
            return super().forward(images, targets)

    monkeypatch.setattr(ckpt, "build_model", InterruptedModel)
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "split", tiny_shapes)
    assert ckpt.load_checkpoint(tmp_path / "split/last.pth")["iteration"] == 3
    run(config, tmp_path / "split", tiny_shapes, resume=True)

    whole = ckpt.load_checkpoint(tmp_path / "whole/last.pth")
    split = ckpt.load_checkpoint(tmp_path / "split/last.pth")
    assert split["iteration"] == whole["iteration"] == 6
    assert_same_weights(whole["model"], split["model"])
    momentum = [s["momentum_buffer"] for s in whole["optimizer"]["state"].values()]
    assert all(torch.equal(m, s["momentum_buffer"])
               for m, s in zip(momentum, split["optimizer"]["state"].values()))
    # The metrics file holds one history: the lines after the checkpoint were rewritten, not doubled.
    iterations = [r["iteration"] for r in read_metrics(tmp_path / "split/metrics.jsonl")]
    assert iterations == sorted(set(iterations)) == [6]


def test_resume_with_another_config_is_refused(tmp_path, tiny_shapes, stand_in):
    run(tiny_config(max_iter=3), tmp_path, tiny_shapes)
    with pytest.raises(ValueError, match=r"differing fields: \['base_lr'\]"):
        run(tiny_config(max_iter=3, base_lr=0.5), tmp_path, tiny_shapes, resume=True)


def test_non_finite_loss_names_loss_and_iteration(tmp_path, tiny_shapes, monkeypatch):
    class ExplodingModel(StandInModel):
        calls = 0

        def forward(self, images, targets):
            losses = super().forward(images, targets)
            ExplodingModel.calls += 1
            if ExplodingModel.calls == 5:  # iteration 4, after the checkpoint at 3
                losses["loss_box"] = losses["loss_box"] * float("nan")
            return losses

    monkeypatch.setattr(ckpt, "build_model", ExplodingModel)
    with pytest.raises(FloatingPointError, match="loss_box is nan at iteration 4"):
        run(tiny_config(), tmp_path, tiny_shapes)
    saved = ckpt.load_checkpoint(tmp_path / "last.pth")
    assert saved["iteration"] == 3
    assert all(torch.isfinite(value).all() for value in saved["model"].values())
    assert not (tmp_path / "model_final.pth").exists()


class OracleStandIn(StandInModel):
    """The stand-in, predicting from a table keyed by the image's bytes (filled by the test)."""

    answers: dict = {}

    @torch.no_grad()
    def predict(self, images):
        return [self.answers[image.numpy().tobytes()] for image in images]


def oracle_answers(shapes):
    """Per val image: every second non-crowd ground-truth object (box, label, mask) with falling
    scores, and one false detection in the corner that outscores them: AP strictly between 0 and 1."""
    from minimrcnn.data import CocoInstances

    dataset = CocoInstances(shapes / "images", shapes / "annotations/instances_val.json")
    answers, image_ids = {}, {}
    for index in range(len(dataset)):
        image, target = dataset[index]
        keep = [j for j in range(len(target["labels"])) if j % 2 == 0 and not target["iscrowd"][j]]
        false_mask = torch.zeros((1,) + image.shape[-2:], dtype=torch.bool)
        false_mask[:, :8, :8] = True
        key = image.numpy().tobytes()
        answers[key] = {
            "boxes": torch.cat([target["boxes"][keep], torch.tensor([[0.0, 0.0, 8.0, 8.0]])]),
            "labels": torch.cat([target["labels"][keep], torch.tensor([2])]),
            "scores": torch.tensor([0.9 - 0.05 * j for j in keep] + [0.95]),
            "masks": torch.cat([target["masks"][keep].bool(), false_mask]),
        }
        image_ids[key] = target["image_id"]
    return answers, image_ids


def oracle_coco_ap(shapes, answers, image_ids, iou_type):
    """COCOeval's first six numbers for the oracle's detections, converted here without the package."""
    import contextlib
    import io

    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for key, answer in answers.items():
        for box, label, score, mask in zip(answer["boxes"].tolist(), answer["labels"].tolist(),
                                           answer["scores"].tolist(), answer["masks"].numpy()):
            x1, y1, x2, y2 = box
            results.append({"image_id": image_ids[key], "category_id": label, "score": score,
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "segmentation": mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(shapes / "annotations/instances_val.json"))
        evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats[:6].tolist()))


def test_outputs_and_evaluation(tmp_path, tiny_shapes, monkeypatch, capsys):
    answers, image_ids = oracle_answers(tiny_shapes)
    monkeypatch.setattr(OracleStandIn, "answers", answers)
    monkeypatch.setattr(ckpt, "build_model", OracleStandIn)
    summary = run(tiny_config(max_iter=3), tmp_path, tiny_shapes, evaluate=True)
    table = capsys.readouterr().out
    assert "segm" in table and "AP50" in table
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == summary
    assert written["iterations"] == 3 and written["device"] == "cpu" and written["config"] == "shapes-cpu"
    for iou_type in ("bbox", "segm"):
        assert set(written[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        # pycocotools' numbers for the model's detections, converted here without the package.
        expected = oracle_coco_ap(tiny_shapes, answers, image_ids, iou_type)
        assert 0 < expected["AP"] < 1
        assert written[iou_type] == pytest.approx(expected, abs=1e-12)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [3]
    assert set(LOSS_NAMES) | {"iteration", "lr", "time", "loss"} == set(records[0])
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    final = ckpt.load_checkpoint(tmp_path / "model_final.pth")
    assert "optimizer" not in final
    assert final["extra"]["class_names"][1:] == ["square", "circle", "triangle", "star"]


def test_time_budget_sets_and_stores_max_iter(tmp_path, tiny_shapes, monkeypatch):
    """A fake clock: each iteration (one forward) takes 1/32 s, nothing else takes any time, so
    the plan is exact and the same on any machine, however slow or loaded."""
    clock = {"now": 0.0}
    seconds_per_iter = 1 / 32  # a power of two: the plan's arithmetic is exact

    class SlowModel(StandInModel):
        def forward(self, images, targets):
            clock["now"] += seconds_per_iter
            return super().forward(images, targets)

    # train.py and schedule.py read the same time module; both see the fake clock.
    monkeypatch.setattr(schedule.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(ckpt, "build_model", SlowModel)
    monkeypatch.setattr(schedule, "FINAL_RESERVE_SECONDS", 0.0)
    config = tiny_config(max_iter=1000, warmup_iters=100)
    summary = run(config, tmp_path, tiny_shapes, time_budget_minutes=0.0625)  # 3.75 s
    saved = ckpt.load_checkpoint(tmp_path / "last.pth")
    # 3.75 s at 1/32 s per iteration (the stand-in predicts in no time: no evaluation reserve)
    # is 120 iterations, far fewer than the config's 1000; the re-plan measures the same speed.
    assert summary["iterations"] == 120
    assert saved["max_iter"] == saved["iteration"] == 120
    # The warm-up shrank with the run: 100 of 1000 iterations became 12 of 120.
    assert saved["scheduler"]["warmup_iters"] == 12


def test_bad_arguments_are_named(tmp_path, tiny_shapes):
    with pytest.raises(ValueError, match="train_images and train_annotations"):
        train_module.dataset_paths(train_images=tiny_shapes / "images")
    with pytest.raises(ValueError, match="val_annotations: .*missing.json does not exist"):
        train_module.dataset_paths(val_images=tiny_shapes / "images", val_annotations=tmp_path / "missing.json",
                                   data_root=tiny_shapes)
    with pytest.raises(ValueError, match="config.amp"):
        train_module.autocast_for(tiny_config(amp="fp8"), torch.device("cpu"))
    with pytest.raises(ValueError, match="batch_size=3 must divide evenly"):
        run(tiny_config(batch_size=3, grad_accum_steps=2), tmp_path, tiny_shapes)
    with pytest.raises(FileNotFoundError, match="last.pth"):
        run(tiny_config(), tmp_path / "nothing_here", tiny_shapes, resume=True)
    # Any COCO-format dataset: the shapes files given explicitly work like the default.
    paths = train_module.dataset_paths(tiny_shapes / "images", tiny_shapes / "annotations/instances_train.json")
    assert paths["val_images"] is None and paths["train_annotations"].name == "instances_train.json"


def test_fp16_grad_scaler_path_matches_plain_step(tiny_shapes):
    """The GradScaler branch of a step (scale, unscale before clipping, step, update) gives the
    plain step's weights: the scale is a power of two, so scaling and unscaling are exact.
    (Autocast itself needs CUDA; the scaler's bookkeeping runs on CPU too.)"""
    from minimrcnn.data import CocoInstances
    from minimrcnn.engine.distributed import InfiniteBatchSampler

    config = tiny_config(batch_size=4, grad_accum_steps=2, grad_clip=0.5)
    dataset = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations/instances_train.json")
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        torch.manual_seed(0)
        model = StandInModel(config)
        optimizer = train_module.build_optimizer(model, config)
        sampler = InfiniteBatchSampler(len(dataset), config.batch_size, config.seed, accum_steps=2)
        batches = iter(train_module.build_train_loader(dataset, config, sampler, torch.device("cpu")))
        for iteration in range(2):
            losses, names = train_module.train_step(model, batches, optimizer, scaler, contextlib.nullcontext(),
                                                    list(model.parameters()), config, iteration, 0,
                                                    torch.device("cpu"))
        results.append((model.state_dict(), losses))
    (plain, plain_losses), (scaled, scaled_losses) = results
    assert names == list(LOSS_NAMES)
    assert torch.equal(plain_losses, scaled_losses)
    assert_same_weights(plain, scaled)
