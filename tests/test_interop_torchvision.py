"""Same weights, same detections: torchvision's Mask R-CNN against minimrcnn's, loaded from its state dict.

Runs in the side venv that has torchvision (``make test`` runs it in ``.venv-tv``); the
main venv skips it. Each model is torchvision's ``MaskRCNN`` over ``resnet_fpn_backbone``,
trained a few steps on a small shapes set so that its outputs are not degenerate, then
converted with ``minimrcnn.interop.from_torchvision`` and compared image by image.
"""

from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN  # noqa: E402
from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: E402
from torchvision.models.detection._utils import overwrite_eps  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d, batched_nms  # noqa: E402

from minimrcnn.interop import fit_briefly, from_torchvision, load_torchvision_state_dict  # noqa: E402
from minimrcnn.ops.nms_torchvision import batched_nms_torchvision  # noqa: E402

ANCHOR_SIZES = (8, 16, 32, 64, 128)  # sized for 128 x 128 images
NUM_CLASSES = 5  # the shapes set's 4 classes + background
# Cheap for a short CPU run: few RoIs and proposals, narrow heads (box head 256 wide, mask
# head 2 x 64 channels: at torchvision's widths the mask head alone costs ~0.5 GFLOP per
# detection), at most 20 detections. The key mapping is the same at any width;
# test_maskrcnn_resnet50_fpn_file_loads_unedited covers the default widths. Test-time
# pre-NMS top-k stays at torchvision's 1000 per level, so the RPN's NMS takes >1000
# boxes (torchvision's per-class loop) and the detections' NMS fewer (its coordinate shift).
TORCHVISION_KWARGS = dict(
    min_size=128, max_size=128,
    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=200,
    rpn_batch_size_per_image=64, box_batch_size_per_image=32, box_detections_per_img=20,
)
HEAD_WIDTHS = dict(box_head_dim=256, mask_head_dim=64, mask_head_num_convs=2)
TRAIN_STEPS = {"resnet18": 16, "resnet50": 8}
NUM_COMPARED = 20  # validation images, plus the resized crops below
BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-4
MASK_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    from minimrcnn.data import CocoInstances
    from minimrcnn.data.shapes import generate_shapes

    root = generate_shapes(tmp_path_factory.mktemp("interop") / "shapes", num_train=16,
                           num_val=NUM_COMPARED, image_size=128, seed=3)
    train = CocoInstances(root / "images", root / "annotations/instances_train.json")
    val = CocoInstances(root / "images", root / "annotations/instances_val.json")
    return train, val


def comparison_images(val) -> list[torch.Tensor]:
    """The validation images, plus crops smaller than 128 px that the models must upscale
    (one by a factor that makes torchvision floor where rounding would differ)."""
    images = [val[index][0] for index in range(len(val))]
    return images + [images[0][:, 10:106, 5:117], images[1][:, :72, :100], images[2][:, 3:100, :]]


def build_torchvision(backbone: str, norm_layer=torch.nn.BatchNorm2d):
    torch.manual_seed(0)
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer, trainable_layers=5)
    anchors = AnchorGenerator(tuple((size,) for size in ANCHOR_SIZES), ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    heads = dict(
        box_head=TwoMLPHead(256 * 7 * 7, HEAD_WIDTHS["box_head_dim"]),
        box_predictor=FastRCNNPredictor(HEAD_WIDTHS["box_head_dim"], NUM_CLASSES),
        mask_head=MaskRCNNHeads(256, [HEAD_WIDTHS["mask_head_dim"]] * HEAD_WIDTHS["mask_head_num_convs"], 1),
        mask_predictor=MaskRCNNPredictor(HEAD_WIDTHS["mask_head_dim"], HEAD_WIDTHS["mask_head_dim"], NUM_CLASSES),
    )
    return TorchvisionMaskRCNN(body, num_classes=None, rpn_anchor_generator=anchors, **heads,
                               **TORCHVISION_KWARGS)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small batches on a shared 2-core machine: one thread avoids OpenMP spinning."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def convert(state_dict, backbone: str):
    return from_torchvision(state_dict, num_classes=NUM_CLASSES, backbone=backbone,
                            anchor_sizes=ANCHOR_SIZES, **HEAD_WIDTHS,
                            **{k: v for k, v in TORCHVISION_KWARGS.items() if "train" not in k})


@pytest.fixture(scope="module")
def trained(shapes_set):
    """backbone name -> a briefly trained torchvision model (BatchNorm2d backbone, eval mode)."""
    train, _ = shapes_set
    return {name: fit_briefly(build_torchvision(name), train, steps=steps, batch_size=2, lr=0.02)
            for name, steps in TRAIN_STEPS.items()}


@torch.no_grad()
def torchvision_stages(model, images):
    """torchvision's FPN features (finest first), RPN proposals and final detections."""
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    return list(features.values()), proposals, model(images)


@torch.no_grad()
def minimrcnn_stages(model, images):
    batch = model.preprocess(images)
    features = model.fpn(model.backbone(batch.tensor))
    proposals, _ = model.rpn(features, batch.image_sizes, None)
    return features, proposals, model.predict(images)


def assert_same_detections(expected: list[dict], actual: list[dict]) -> int:
    """Per image: same count and labels, boxes/scores within tolerance, masks agreeing.
    Returns the number of detections compared."""
    compared = 0
    for index, (theirs, ours) in enumerate(zip(expected, actual)):
        where = f"image {index}"
        assert ours["boxes"].shape == theirs["boxes"].shape, f"{where}: detection counts differ"
        assert torch.equal(ours["labels"], theirs["labels"]), f"{where}: labels differ"
        if theirs["boxes"].shape[0] == 0:
            continue
        box_error = (ours["boxes"] - theirs["boxes"]).abs().max().item()
        score_error = (ours["scores"] - theirs["scores"]).abs().max().item()
        assert box_error <= BOX_TOLERANCE, f"{where}: boxes differ by {box_error} px"
        assert score_error <= SCORE_TOLERANCE, f"{where}: scores differ by {score_error}"
        their_masks = theirs["masks"][:, 0] >= 0.5  # torchvision returns probabilities [D, 1, H, W]
        agreement = (their_masks == ours["masks"]).float().mean().item()
        assert agreement >= MASK_AGREEMENT, f"{where}: masks agree on {agreement:.5f} of pixels"
        compared += theirs["boxes"].shape[0]
    return compared


def assert_same_model_outputs(tv_model, our_model, images, check_spread: bool = True):
    tv_features, tv_proposals, tv_detections = torchvision_stages(tv_model, images)
    features, proposals, detections = minimrcnn_stages(our_model, images)
    assert len(features) == len(tv_features) == 5
    for level, (theirs, ours) in enumerate(zip(tv_features, features), start=2):
        assert ours.shape == theirs.shape, f"P{level}: shapes differ"
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"P{level} features differ")
    for index, (theirs, ours) in enumerate(zip(tv_proposals, proposals)):
        assert ours.shape == theirs.shape, f"image {index}: {len(ours)} proposals vs torchvision's {len(theirs)}"
        torch.testing.assert_close(ours, theirs, rtol=0, atol=BOX_TOLERANCE,
                                   msg=f"image {index}: proposals differ")
    compared = assert_same_detections(tv_detections, detections)
    # Not degenerate: most images have detections, and their scores spread.
    assert sum(len(d["boxes"]) > 0 for d in tv_detections) >= len(images) * 3 // 4
    scores = torch.cat([d["scores"] for d in tv_detections])
    if check_spread:
        assert scores.max() - scores.min() > 0.1, "scores barely differ: train the model longer"
    return compared, scores


@pytest.mark.parametrize("backbone", sorted(TRAIN_STEPS))
def test_same_detections_as_torchvision(trained, shapes_set, backbone):
    _, val = shapes_set
    tv_model = trained[backbone]
    our_model = convert(tv_model.state_dict(), backbone)
    assert our_model.config.norm == "bn" and not our_model.training
    images = comparison_images(val)
    compared, scores = assert_same_model_outputs(tv_model, our_model, images)
    assert compared >= len(images)
    # Tied scores would make the comparison depend on how each side breaks ties; with
    # torchvision's own sorts replicated they are broken the same way, and the positional
    # comparison above covers them. Report how many there were.
    print(f"{backbone}: {compared} detections on {len(images)} images, "
          f"{len(scores) - len(torch.unique(scores))} tied scores")


def test_frozen_batchnorm_eps_zero(trained, shapes_set):
    """torchvision's pretrained flavour: FrozenBatchNorm2d with eps 0 (no num_batches_tracked)."""
    _, val = shapes_set
    frozen = build_torchvision("resnet50", norm_layer=FrozenBatchNorm2d)
    frozen.load_state_dict(trained["resnet50"].state_dict())  # its hook drops num_batches_tracked
    overwrite_eps(frozen, 0.0)
    frozen.eval()
    state = frozen.state_dict()
    assert not any(key.endswith("num_batches_tracked") for key in state)
    ours = convert(state, "resnet50")
    assert ours.config.norm == "frozen_bn" and ours.config.norm_eps == 0.0
    # The trained weights with eps 0: compared as they are (their scores spread less, as the
    # BatchNorm statistics are no longer those the heads were trained with).
    assert_same_model_outputs(frozen, ours, comparison_images(val)[:6], check_spread=False)


def _legacy_names(state_dict):
    """The names torchvision's version hooks remap (RPNHead, FPN and MaskRCNNHeads v1)."""
    legacy = {}
    for key, value in state_dict.items():
        new = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for kind in ("inner_blocks", "layer_blocks"):
            for index in range(4):
                new = new.replace(f"backbone.fpn.{kind}.{index}.0.", f"backbone.fpn.{kind}.{index}.")
        for index in range(4):
            new = new.replace(f"roi_heads.mask_head.{index}.0.", f"roi_heads.mask_head.mask_fcn{index + 1}.")
        legacy[new] = value
    return legacy


def test_legacy_key_names(trained):
    current = trained["resnet18"].state_dict()
    legacy = _legacy_names(current)
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn2.weight" in legacy  # 2 convs here
    # The legacy names are genuine: torchvision itself loads them (no version metadata -> v1 hooks).
    build_torchvision("resnet18").load_state_dict(dict(legacy))
    from_current, from_legacy = convert(current, "resnet18"), convert(legacy, "resnet18")
    for key, value in from_current.state_dict().items():
        assert torch.equal(value, from_legacy.state_dict()[key]), key


def test_maskrcnn_resnet50_fpn_file_loads_unedited(tmp_path):
    torch.manual_seed(0)
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=128, max_size=128,
                                      box_score_thresh=0.0, box_detections_per_img=5).eval()
    path = tmp_path / "maskrcnn_resnet50_fpn.pth"
    torch.save(reference.state_dict(), path)
    ours = from_torchvision(path, min_size=128, max_size=128, box_score_thresh=0.0, box_detections_per_img=5)
    assert ours.config.num_classes == 91 and ours.config.norm == "bn"
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))]
    _, tv_proposals, tv_detections = torchvision_stages(reference, images)
    _, proposals, detections = minimrcnn_stages(ours, images)
    torch.testing.assert_close(proposals[0], tv_proposals[0], rtol=0, atol=BOX_TOLERANCE)
    assert_same_detections(tv_detections, detections)


def test_wrong_backbone_lists_keys(trained):
    with pytest.raises(ValueError, match="shape mismatches") as error:
        from_torchvision(trained["resnet18"].state_dict(), num_classes=NUM_CLASSES, backbone="resnet50")
    assert "backbone.layer1.0.conv3.weight" in str(error.value)  # missing: ResNet-18 has no conv3


def _nms_inputs(num_boxes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(num_boxes, 2, generator=generator) * 100
    sizes = torch.rand(num_boxes, 2, generator=generator) * 30 + 1
    boxes = torch.cat([corners, corners + sizes], dim=1)
    # Scores on a coarse grid: many exact ties, broken by each side's sort.
    scores = torch.randint(0, 20, (num_boxes,), generator=generator).float() / 20
    classes = torch.randint(0, 4, (num_boxes,), generator=generator)
    return boxes, scores, classes


@pytest.mark.parametrize("num_boxes", [300, 1500])  # both of torchvision's branches (<= / > 1000 boxes)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_matches_torchvision(num_boxes, seed):
    boxes, scores, classes = _nms_inputs(num_boxes, seed)
    # Duplicated boxes: IoU exactly 1 and exact score ties between them.
    boxes, scores, classes = torch.cat([boxes, boxes[:50]]), torch.cat([scores, scores[:50]]), \
        torch.cat([classes, classes[:50]])
    for threshold in (0.3, 0.5, 0.7):
        expected = batched_nms(boxes, scores, classes, threshold)
        assert torch.equal(batched_nms_torchvision(boxes, scores, classes, threshold), expected)


def test_load_into_existing_model_checks_shapes(trained):
    model = convert(trained["resnet18"].state_dict(), "resnet18")
    state = {k: v for k, v in trained["resnet18"].state_dict().items()}
    state["roi_heads.box_head.fc6.weight"] = state["roi_heads.box_head.fc6.weight"][:, :10]
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): roi_heads.box_head.fc6.weight"):
        load_torchvision_state_dict(model, state)
