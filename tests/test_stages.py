"""modeling.stages.trace_detection_stages: the stages agree with each other and with model.predict."""

import dataclasses

import pytest
import torch

from minimrcnn import MaskRCNN
from minimrcnn.modeling.stages import trace_detection_stages
from minimrcnn.ops.boxes import batched_nms, box_iou
from test_model import tiny_config


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    # 48 x 80 images are resized to a 64-pixel short side: the stages must come back in input pixels.
    model = MaskRCNN(tiny_config()).train()
    image = torch.rand(3, 48, 80, generator=torch.Generator().manual_seed(1))
    return model, image, trace_detection_stages(model, image)


def test_stages_agree_with_predict(traced):
    model, image, stages = traced
    assert model.training  # the mode is restored
    predicted = model.predict([image])[0]
    detections = stages["detections"]
    assert len(detections["boxes"]) > 0
    assert torch.allclose(detections["boxes"], predicted["boxes"], atol=1e-4)
    assert torch.equal(detections["labels"], predicted["labels"])
    assert torch.allclose(detections["scores"], predicted["scores"])
    assert float(stages["proposals"][:, 2].max()) <= 80 and float(stages["proposals"][:, 3].max()) <= 48


def test_candidates_are_what_per_class_nms_filters(traced):
    model, _, stages = traced
    config = model.config
    candidates, detections = stages["candidates"], stages["detections"]
    scores, labels = candidates["scores"], candidates["labels"]
    assert bool((scores > config.score_thresh).all())
    assert torch.equal(scores, stages["class_scores"][candidates["proposal_index"], labels])
    # Per-class NMS over the candidates, the best detections_per_image: exactly the detections.
    kept = batched_nms(candidates["boxes"], scores, labels, config.nms_thresh)[: config.detections_per_image]
    assert torch.allclose(candidates["boxes"][kept], detections["boxes"], atol=1e-4)
    assert torch.equal(labels[kept], detections["labels"])
    # NMS removed something here (an untrained head scores every class alike): the check is not empty.
    assert len(kept) < len(scores)
    overlapping = box_iou(detections["boxes"], detections["boxes"]) > config.nms_thresh
    same_class = detections["labels"][:, None] == detections["labels"][None, :]
    assert not bool((overlapping & same_class).fill_diagonal_(False).any())


def test_shapes_and_refinement(traced):
    model, _, stages = traced
    num_proposals, num_things = len(stages["proposals"]), model.config.num_classes - 1
    assert stages["objectness_logits"].shape == (num_proposals,)
    assert bool((stages["objectness_logits"][:-1] >= stages["objectness_logits"][1:]).all())  # best first
    assert stages["class_scores"].shape == (num_proposals, num_things + 1)
    assert torch.allclose(stages["class_scores"].sum(dim=1), torch.ones(num_proposals))
    assert stages["refined_boxes"].shape == (num_proposals, num_things, 4)
    best = stages["class_scores"][:, 1:].argmax(dim=1)
    assert torch.equal(stages["refined_labels"], best + 1)
    assert torch.equal(stages["refined"], stages["refined_boxes"][torch.arange(num_proposals), best])
    # Small untrained deltas: each refinement stays near its proposal (a few pixels at most).
    moved = stages["refined_boxes"] - stages["proposals"][:, None, :]
    assert 0 < float(moved.abs().max()) < 8


def test_rejects_the_torchvision_filtering():
    model = MaskRCNN(dataclasses.replace(tiny_config(), box_filtering="torchvision"))
    with pytest.raises(ValueError, match="box_filtering"):
        trace_detection_stages(model, torch.rand(3, 32, 32))
