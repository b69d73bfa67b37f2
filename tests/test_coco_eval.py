"""Model outputs -> COCO results, the pycocotools wrapper, the AP table, dataset inference."""

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from minimrcnn.evaluation.coco import (
    AP_NAMES,
    encode_masks,
    evaluate_coco,
    format_ap_table,
    predictions_to_coco_results,
)
from minimrcnn.evaluation.coco_ap import coco_ap
from minimrcnn.engine.inference import predict_dataset

HEIGHT, WIDTH = 96, 128


def random_masks(rng, count, height=HEIGHT, width=WIDTH) -> torch.Tensor:
    """Count random rectangles and ellipses as bool masks [D, H, W]."""
    ys, xs = np.mgrid[0:height, 0:width]
    masks = []
    for _ in range(count):
        cy, cx = rng.uniform(10, height - 10), rng.uniform(10, width - 10)
        ry, rx = rng.uniform(3, 40), rng.uniform(3, 40)
        if rng.random() < 0.5:
            mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        else:
            mask = (np.abs(ys - cy) <= ry) & (np.abs(xs - cx) <= rx)
        masks.append(mask)
    return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.bool)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes [D, 4] of masks [D, H, W], pixel edges included."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def make_scene(seed, num_images=4):
    """Ground truth (COCO dict, labels 1..3 -> category ids 10, 20, 30) and per-image objects."""
    rng = np.random.default_rng(seed)
    category_ids = [0, 10, 20, 30]  # entry 0: background
    images, annotations, objects = [], [], []
    for image_id in range(1, num_images + 1):
        masks = random_masks(rng, int(rng.integers(1, 5)))
        labels = torch.from_numpy(rng.integers(1, 4, size=len(masks)))
        boxes = masks_to_boxes(masks)
        images.append({"id": image_id, "height": HEIGHT, "width": WIDTH, "file_name": f"{image_id}.png"})
        for mask, label, rle in zip(masks, labels, encode_masks(masks)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[int(label)], "segmentation": rle,
                                "area": float(mask.sum()), "bbox": mask_utils.toBbox(rle).tolist(),
                                "iscrowd": 0})
        objects.append({"boxes": boxes, "labels": labels, "masks": masks})
    categories = [{"id": c, "name": f"c{c}"} for c in category_ids[1:]]
    return {"images": images, "annotations": annotations, "categories": categories}, objects, category_ids


# -------------------------------------------------------------- predictions_to_coco_results

def test_results_round_trip_masks_and_boxes():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 5)
    boxes = torch.tensor([[1.5, 2.0, 11.5, 22.0], [0, 0, 5, 5], [3, 4, 3, 9], [10, 10, 60, 70], [7, 8, 9, 10]])
    prediction = {"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1, 2]),
                  "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), "masks": masks}
    results = predictions_to_coco_results([prediction], [42], [0, 10, 20, 30])
    assert [r["category_id"] for r in results] == [10, 20, 30, 10, 20]
    assert all(r["image_id"] == 42 for r in results)
    np.testing.assert_allclose([r["score"] for r in results], [0.9, 0.8, 0.7, 0.6, 0.5], rtol=1e-6)
    np.testing.assert_allclose(results[0]["bbox"], [1.5, 2.0, 10.0, 20.0])
    np.testing.assert_allclose(results[2]["bbox"], [3, 4, 0, 5])
    for result, mask in zip(results, masks):
        assert isinstance(result["segmentation"]["counts"], str)  # JSON-ready
        assert result["segmentation"]["size"] == [HEIGHT, WIDTH]
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]), mask.numpy())


def test_results_label_mapping_and_empty_images():
    prediction = {"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([2]),
                  "scores": torch.tensor([0.5])}  # a box-only model: no masks
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, HEIGHT, WIDTH, dtype=torch.bool)}
    results = predictions_to_coco_results([prediction, empty], [1, 2], {1: 5, 2: 7})
    assert results == [{"image_id": 1, "category_id": 7, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 0.5}]
    assert predictions_to_coco_results([prediction], [1])[0]["category_id"] == 2  # labels are ids
    with pytest.raises(ValueError, match="label 2"):
        predictions_to_coco_results([prediction], [1], [0, 5])
    with pytest.raises(ValueError, match="image_ids"):
        predictions_to_coco_results([prediction], [1, 2])
    with pytest.raises(ValueError, match="masks"):
        encode_masks(torch.zeros(4, 4, dtype=torch.bool))


# ------------------------------------------------------------------------ evaluate_coco

def test_perfect_predictions_score_one():
    gt, objects, category_ids = make_scene(1)
    predictions = [dict(o, scores=torch.linspace(0.9, 0.5, len(o["labels"]))) for o in objects]
    results = predictions_to_coco_results(predictions, [image["id"] for image in gt["images"]],
                                          category_ids)
    metrics = evaluate_coco(gt, results)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(AP_NAMES)
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP75"] == pytest.approx(1.0)


def test_evaluate_coco_agrees_with_our_ap_on_noisy_predictions(tmp_path):
    gt, objects, category_ids = make_scene(2, num_images=6)
    rng = np.random.default_rng(2)
    predictions = []
    for o in objects:
        shift = torch.from_numpy(rng.integers(-3, 4, size=(len(o["boxes"]), 1))).float()
        masks = torch.stack([torch.roll(m, int(s), dims=1) for m, s in zip(o["masks"], shift[:, 0])])
        predictions.append({"boxes": o["boxes"] + shift * torch.tensor([1.0, 0, 1, 0]), "labels": o["labels"],
                            "scores": torch.from_numpy(rng.uniform(0, 1, len(o["labels"]))).float(),
                            "masks": masks})
    results = predictions_to_coco_results(predictions, [image["id"] for image in gt["images"]],
                                          category_ids)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    metrics = evaluate_coco(str(path), results)
    for iou_type in ("bbox", "segm"):
        ours = coco_ap(gt, results, iou_type)[:6]
        np.testing.assert_allclose([metrics[iou_type][n] for n in AP_NAMES], ours, atol=1e-6)
        assert 0 < metrics[iou_type]["AP"] < 1


def test_evaluate_coco_without_results_and_bad_input():
    gt, _, _ = make_scene(3)
    metrics = evaluate_coco(gt, [], iou_types=("segm",))
    assert metrics == {"segm": {name: 0.0 for name in AP_NAMES}}
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(gt, [], iou_types=("keypoints",))
    with pytest.raises(ValueError, match=r"image ids .*\[99\]"):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 10, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="nope.json"):
        evaluate_coco("nope.json", [])


def test_format_ap_table_shows_the_numbers():
    metrics = {"bbox": dict(zip(AP_NAMES, [0.5234, 0.81, 0.6, -1.0, 0.45, 0.7])),
               "segm": dict(zip(AP_NAMES, [0.4321, 0.79, 0.5, 0.1, 0.4, 0.65]))}
    table = format_ap_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 3 and all(name in lines[0] for name in AP_NAMES)
    assert lines[1].split() == ["bbox", "52.3", "81.0", "60.0", "-", "45.0", "70.0"]
    assert lines[2].split() == ["segm", "43.2", "79.0", "50.0", "10.0", "40.0", "65.0"]


# ------------------------------------------------------------------------ predict_dataset

class OracleModel(torch.nn.Module):
    """Predicts one box per image, its coordinates made from the image's mean, and counts calls."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.batch_sizes = []
        self.seen_modes = []

    def predict(self, images):
        self.batch_sizes.append(len(images))
        self.seen_modes.append((self.training, torch.is_grad_enabled()))
        outputs = []
        for image in images:
            value = image.mean() * self.weight
            outputs.append({"boxes": value.repeat(1, 4), "labels": torch.ones(1, dtype=torch.int64),
                            "scores": value.reshape(1),
                            "masks": torch.zeros(1, *image.shape[1:], dtype=torch.bool)})
        return outputs


class ConstantImages(torch.utils.data.Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, index):
        return torch.full((3, 8, 10), float(index)), {"image_id": torch.tensor(100 + index)}


def test_predict_dataset_keeps_order_batches_and_mode():
    model = OracleModel().train()
    outputs = predict_dataset(model, ConstantImages(), batch_size=3)
    assert [image_id for image_id, _ in outputs] == list(range(100, 107))
    assert all(isinstance(image_id, int) for image_id, _ in outputs)
    assert [float(p["scores"][0]) for _, p in outputs] == [float(i) for i in range(7)]
    assert model.batch_sizes == [3, 3, 1]
    assert model.seen_modes == [(False, False)] * 3  # eval mode, no autograd
    assert model.training  # given back as it came
    assert not outputs[0][1]["scores"].requires_grad

    subset = predict_dataset(model, ConstantImages(), batch_size=8, indices=[5, 1])
    assert [image_id for image_id, _ in subset] == [105, 101]
    with pytest.raises(ValueError, match="batch_size"):
        predict_dataset(model, ConstantImages(), batch_size=0)


# ------------------------------------------------------------------- the evaluate command

def test_evaluate_command_end_to_end(tiny_shapes, tmp_path, capsys):
    """An untrained model's checkpoint through ``python -m minimrcnn evaluate``: the plumbing."""
    from minimrcnn import MaskRCNN, get_config
    from minimrcnn.cli import main
    from minimrcnn.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    config = get_config("shapes-cpu")
    checkpoint = save_checkpoint(tmp_path / "model.pth", MaskRCNN(config), None, {"max_iter": 0}, 0,
                                 config=config)
    gt = json.loads((tiny_shapes / "annotations" / "instances_val.json").read_text())
    kept = {image["id"] for image in gt["images"][:2]}  # two images keep the test quick
    gt["images"] = [image for image in gt["images"] if image["id"] in kept]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
    annotations = tmp_path / "val2.json"
    annotations.write_text(json.dumps(gt))

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--images", str(tiny_shapes / "images"),
                 "--annotations", str(annotations), "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert set(metrics) == {"bbox", "segm"} and set(metrics["segm"]) == set(AP_NAMES)
    assert format_ap_table(metrics) in printed
    assert {r["image_id"] for r in results} <= kept
    assert all({"bbox", "segmentation", "score", "category_id"} <= set(r) for r in results)
    valid_categories = {c["id"] for c in gt["categories"]}
    assert {r["category_id"] for r in results} <= valid_categories
