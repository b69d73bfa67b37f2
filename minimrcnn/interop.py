"""torchvision's Mask R-CNN weights in minimrcnn's model: same weights, same detections.

``from_torchvision(path_or_state_dict)`` builds a :class:`~minimrcnn.modeling.model.MaskRCNN`
with torchvision's conventions switched on (``torchvision_config``) and loads the
state dict through a key mapper (``load_torchvision_state_dict``). The package never
imports torchvision: the file is read with ``torch.load(weights_only=True)``.

    from minimrcnn.interop import from_torchvision
    model = from_torchvision("maskrcnn_resnet50_fpn_coco.pth")   # eval mode, 91 classes
    predictions = model.predict([image])                          # torchvision's detections

Where the two implementations differ (the only place this is written down). Each row
is a Config field; its default is this package's (Detectron2's) convention and
``torchvision_config`` sets torchvision's (``torchvision.models.detection``, 0.29):

=========================  ==========================================  ==========================================
field                      minimrcnn default (Detectron2)              torchvision (``torchvision_config``)
=========================  ==========================================  ==========================================
``resize_rule``            ``"round"``: each side ``round(side * s)``;  ``"torchvision"``: ``floor(side * s)``
                           boxes back by ``/ s``, clipped               (``interpolate(scale_factor=s,
                                                                        recompute_scale_factor=True)``); boxes
                                                                        back by float32 ratios original/resized,
                                                                        no second clip
``anchor_offset``          0.5: anchors centred on their cell          0.0: at ``index * stride``
``anchor_rounding``        False: exact ``w = s / sqrt(r)``,           True: cell anchors rounded to integers
                           ``h = s * sqrt(r)``                         (halves to even); stride per axis =
                                                                        padded size // grid size
``rpn_min_box_size``       0.0                                         1e-3
``box_min_size``           0.0                                         1e-2
``box_filtering``          ``"detectron2"``: keep ``w, h > min``;      ``"torchvision"``: keep ``w, h >= min``
                           NMS on logits (RPN) with float64 IoU,       (``remove_small_boxes``); proposals ranked
                           all images at once                          by sigmoid probability; its
                                                                        ``batched_nms`` arithmetic (float32 IoU,
                                                                        class offsets up to 1000 boxes on CPU,
                                                                        else a loop over classes), per image
``roi_aligned``            True (half-pixel offset)                    False
``roi_sampling_ratio``     0 (adaptive, ``ceil(roi / out)``)           2
``roi_level_mapper``       ``"detectron2"``:                           ``"torchvision"``:
                           ``floor(4 + log2(sqrt(A)/224 + 1e-8))``     ``floor(4 + log2(sqrt(A)/224) + 1e-6)``
``mask_paste``             ``"detectron2"``: bilinear samples at       ``"torchvision"``: mask padded by one
                           pixel centres over the exact box            cell, box expanded by (M+2)/M and
                                                                        truncated to int64, mask resized to the
                                                                        inclusive integer box
``norm_eps``               1e-5                                        1e-5 for BatchNorm2d state; 0.0 for
                                                                        FrozenBatchNorm2d state (torchvision's
                                                                        pretrained detectors set 0.0)
``norm``                   per preset                                  ``"bn"`` for a state dict with
                                                                        ``num_batches_tracked``, else
                                                                        ``"frozen_bn"``
``channels_last``          per preset                                  False (same convolution kernels)
=========================  ==========================================  ==========================================

The same in both, so no switch: normalize before resizing; zero padding to a multiple
of 32; ResNet with the stride on the 3x3 conv; FPN with nearest top-down upsampling and
P6 = ``max_pool2d(P5, kernel 1, stride 2)`` (torchvision's ``pool`` level); RPN per-level
top-k on logits, clipping, per-level NMS and per-image top-k; box coder weights (1, 1, 1, 1)
and (10, 10, 5, 5) with ``dw, dh`` clamped at ``log(1000 / 16)`` from above; softmax over
all classes with the background dropped, ``score > thresh``, per-class NMS, top-k; the
mask head run on the final boxes and read at the predicted class's channel.

Two layout differences are handled by the key mapper, not the model: torchvision's
box regressor and mask predictor carry a background row (4 and 1 outputs) that is
never read at inference, so those rows are dropped. Output masks are binary here
(probability ``>= mask_thresh``); torchvision returns the pasted probabilities.

Not reproduced: training. Loss normalization, sampling and the RPN's train-time top-k
keep this package's conventions; fine-tuning from torchvision weights
(``python -m minimrcnn train --init-from-torchvision FILE``) trains with them.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from pathlib import Path

import torch

from minimrcnn.config import Config

# torchvision's resnet_fpn_backbone names -> depth.
BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}

# torchvision's MaskRCNN constructor keywords -> Config fields (same meaning, other names).
TORCHVISION_KEYWORDS = {
    "min_size": "min_size_test",
    "max_size": "max_size",
    "image_mean": "pixel_mean",
    "image_std": "pixel_std",
    "rpn_pre_nms_top_n_train": "rpn_pre_nms_topk_train",
    "rpn_pre_nms_top_n_test": "rpn_pre_nms_topk_test",
    "rpn_post_nms_top_n_train": "rpn_post_nms_topk_train",
    "rpn_post_nms_top_n_test": "rpn_post_nms_topk_test",
    "rpn_nms_thresh": "rpn_nms_thresh",
    "rpn_fg_iou_thresh": "rpn_fg_iou_thresh",
    "rpn_bg_iou_thresh": "rpn_bg_iou_thresh",
    "rpn_batch_size_per_image": "rpn_batch_size_per_image",
    "rpn_positive_fraction": "rpn_positive_fraction",
    "box_score_thresh": "score_thresh",
    "box_nms_thresh": "nms_thresh",
    "box_detections_per_img": "detections_per_image",
    "box_fg_iou_thresh": "roi_fg_iou_thresh",
    "box_batch_size_per_image": "roi_batch_size_per_image",
    "box_positive_fraction": "roi_positive_fraction",
    "bbox_reg_weights": "box_reg_weights",
}

# torchvision's defaults for Mask R-CNN R50-FPN, with 800 / 1333 inputs.
TORCHVISION_DEFAULTS = dict(
    num_classes=91,  # COCO's 90 category ids (with gaps) + background: label == category id
    min_size=(800,),
    min_size_test=800,
    max_size=1333,
    pixel_mean=(0.485, 0.456, 0.406),
    pixel_std=(0.229, 0.224, 0.225),
    size_divisibility=32,
    channels_last=False,
    fpn_channels=256,
    fpn_levels=(2, 3, 4, 5, 6),
    anchor_sizes=(32, 64, 128, 256, 512),
    anchor_aspect_ratios=(0.5, 1.0, 2.0),
    rpn_pre_nms_topk_train=2000,
    rpn_pre_nms_topk_test=1000,
    rpn_post_nms_topk_train=2000,
    rpn_post_nms_topk_test=1000,
    rpn_nms_thresh=0.7,
    rpn_min_box_size=1e-3,
    roi_op="align",
    roi_sampling_ratio=2,
    roi_canonical_level=4,
    roi_canonical_size=224,
    box_pool_size=7,
    box_head_dim=1024,
    box_reg_weights=(10.0, 10.0, 5.0, 5.0),
    mask_head="fcn",
    mask_loss="sigmoid",
    mask_pool_size=14,
    mask_resolution=28,
    mask_head_dim=256,
    mask_head_num_convs=4,
    score_thresh=0.05,
    nms_thresh=0.5,
    detections_per_image=100,
    mask_thresh=0.5,
    # The conventions (see the table above).
    resize_rule="torchvision",
    anchor_offset=0.0,
    anchor_rounding=True,
    box_min_size=1e-2,
    box_filtering="torchvision",
    roi_aligned=False,
    roi_level_mapper="torchvision",
    mask_paste="torchvision",
)


def torchvision_config(*, num_classes: int = 91, backbone: str = "resnet50", min_size: int = 800,
                       max_size: int = 1333, norm: str = "frozen_bn", norm_eps: float = 0.0,
                       **overrides) -> Config:
    """The Config of torchvision's ``MaskRCNN`` with ``resnet_fpn_backbone(backbone)``.

    Keywords take torchvision's constructor names where they mean the same thing
    (``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``,
    ``rpn_pre_nms_top_n_test``, ... see ``TORCHVISION_KEYWORDS``) or any Config field
    (``anchor_sizes``, ``fpn_channels``, ...). ``norm``/``norm_eps``: "frozen_bn" with 0.0
    (torchvision's pretrained detectors) or "bn" with 1e-5 (a model built without weights).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone: expected one of {sorted(BACKBONES)}, got {backbone!r}")
    fields = {field.name for field in dataclasses.fields(Config)}
    # frozen_stages=0: a frozen stage swaps its BatchNorm2d for FrozenBatchNorm2d, whose
    # arithmetic differs from BatchNorm2d's eval kernel in the last float bits.
    values = dict(TORCHVISION_DEFAULTS, num_classes=num_classes, backbone_depth=BACKBONES[backbone],
                  backbone_width=64, norm=norm, norm_eps=norm_eps, backbone_weights=None, frozen_stages=0)
    min_sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (int(min_size),)
    # torchvision trains on a random one of min_size and tests on the last.
    values.update(min_size=min_sizes, min_size_test=min_sizes[-1], max_size=int(max_size))
    unknown = []
    for key, value in overrides.items():
        field = TORCHVISION_KEYWORDS.get(key, key)
        if field not in fields or key == "min_size_test":
            unknown.append(key)
            continue
        values[field] = tuple(value) if isinstance(value, list) else value
    if unknown:
        raise ValueError(f"torchvision_config: unknown keywords {sorted(unknown)}; expected torchvision's "
                         f"MaskRCNN names {sorted(TORCHVISION_KEYWORDS)} or Config fields")
    return Config(name=f"torchvision-maskrcnn-{backbone}-fpn", **values)


# ---------------------------------------------------------------- state dicts


def read_state_dict(state_dict_or_path) -> dict:
    """A state dict, or one read from a file with ``torch.load(weights_only=True)``
    (also accepted: one under ``"model"`` or ``"state_dict"``, and ``module.`` prefixes)."""
    if isinstance(state_dict_or_path, (str, Path)):
        path = Path(state_dict_or_path)
        if not path.is_file():
            raise ValueError(f"torchvision weights: no such file {str(path)!r}")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ValueError(f"{path}: could not be read as a torch state dict ({exc})") from exc
        source = str(path)
    else:
        loaded, source = state_dict_or_path, "state_dict"
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{source}: expected a state dict (name -> tensor)")
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module."):]: value for key, value in loaded.items()}
    return dict(loaded)


# Legacy names that torchvision's version hooks still load (RPNHead v1, FPN v1, MaskRCNNHeads v1).
_LEGACY_RENAMES = (
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)$"), r"backbone.fpn.\1_blocks.\2.0.\3"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),  # 1-based -> i.0
)


def current_torchvision_names(state_dict: dict) -> dict:
    """Rename legacy torchvision keys to the current layout (the rest unchanged)."""
    renamed = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in _LEGACY_RENAMES:
            match = pattern.match(key)
            if match is None:
                continue
            if replacement is None:
                new_key = f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.{match.group(2)}"
            else:
                new_key = pattern.sub(replacement, key)
            break
        renamed[new_key] = value
    return renamed


def _torchvision_to_minimrcnn_key(key: str, num_mask_convs: int) -> str | None:
    """A current-layout torchvision key -> this package's key (None when it has no counterpart)."""
    if key.startswith("backbone.body."):
        return "backbone." + key[len("backbone.body."):]
    rules = (
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)$", r"fpn.lateral_convs.\1.\2"),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)$", r"fpn.output_convs.\1.\2"),
        (r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1"),
        (r"^rpn\.head\.cls_logits\.(weight|bias)$", r"rpn.head.objectness_logits.\1"),
        (r"^rpn\.head\.bbox_pred\.(weight|bias)$", r"rpn.head.anchor_deltas.\1"),
        (r"^roi_heads\.box_head\.fc6\.(weight|bias)$", r"roi_heads.box_head.fc1.\1"),
        (r"^roi_heads\.box_head\.fc7\.(weight|bias)$", r"roi_heads.box_head.fc2.\1"),
        (r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$", r"roi_heads.box_head.class_logits.\1"),
        (r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$", r"roi_heads.box_head.box_deltas.\1"),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)$", r"roi_heads.mask_head.mask_logits.\1"),
        # The transposed conv follows the convs in our Sequential: conv, ReLU pairs, then it.
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)$",
         rf"roi_heads.mask_head.layers.{2 * num_mask_convs}.\1"),
    )
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    match = re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", key)
    if match:  # conv k sits at Sequential index 2k (each is followed by a ReLU)
        return f"roi_heads.mask_head.layers.{2 * int(match.group(1))}.{match.group(2)}"
    return None


def _drop_background_outputs(key: str, value: torch.Tensor) -> torch.Tensor:
    """torchvision predicts boxes and masks for the background class too; never read, dropped."""
    if key.startswith("roi_heads.box_head.box_deltas."):
        return value[4:]  # rows 0..3: the background's 4 deltas
    if key.startswith("roi_heads.mask_head.mask_logits."):
        return value[1:]  # channel 0: the background's mask
    return value


def _count_mask_convs(state_dict: dict) -> int:
    indices = {int(m.group(1)) for key in state_dict
               if (m := re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.weight$", key))}
    return len(indices)


def load_torchvision_state_dict(model, state_dict) -> None:
    """Copy a torchvision ``MaskRCNN`` state dict (current or legacy names, BatchNorm2d or
    FrozenBatchNorm2d norms) into ``model``, a minimrcnn MaskRCNN of matching shapes.

    Raises a ValueError listing every unknown key, every missing one and every shape
    mismatch. ``num_batches_tracked`` counters are accepted and ignored.
    """
    state_dict = current_torchvision_names(read_state_dict(state_dict))
    model_state = model.state_dict()
    num_mask_convs = model.config.mask_head_num_convs
    converted, unknown, mismatched, mismatched_targets = {}, [], [], set()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # a BatchNorm2d step counter; FrozenBatchNorm2d has none
        target = _torchvision_to_minimrcnn_key(key, num_mask_convs)
        if target is None or target not in model_state:
            unknown.append(key)
            continue
        value = _drop_background_outputs(target, value)
        if value.shape != model_state[target].shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {target} {tuple(model_state[target].shape)}")
            mismatched_targets.add(target)
            continue
        converted[target] = value
    missing = sorted(key for key in model_state if key not in converted and key not in mismatched_targets
                     and not key.endswith("num_batches_tracked"))
    problems = []
    for title, keys in (("unknown keys", sorted(unknown)), ("missing keys", missing),
                        ("shape mismatches", mismatched)):
        if keys:
            problems.append(f"{title} ({len(keys)}): " + ", ".join(keys))
    if problems:
        raise ValueError("torchvision state dict does not fit this model: " + "; ".join(problems))
    model.load_state_dict(converted, strict=False)


def infer_norm(state_dict: dict) -> str:
    """"bn" when the backbone's norms carry ``num_batches_tracked`` (BatchNorm2d), else "frozen_bn"."""
    return "bn" if any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked")
                       for k in state_dict) else "frozen_bn"


def from_torchvision(state_dict_or_path, *, num_classes: int = 91, backbone: str = "resnet50",
                     min_size: int = 800, max_size: int = 1333, **overrides):
    """A minimrcnn MaskRCNN (eval mode) that gives torchvision's detections from its weights.

    ``state_dict_or_path``: a state dict of ``torchvision.models.detection.MaskRCNN`` or
    a file holding one. ``norm`` is inferred (BatchNorm2d state -> "bn" with eps 1e-5,
    FrozenBatchNorm2d state -> "frozen_bn" with eps 0.0, torchvision's pretrained setting);
    pass ``norm=`` / ``norm_eps=`` to override. Other keywords: see :func:`torchvision_config`.
    """
    from minimrcnn.modeling.model import MaskRCNN

    state_dict = current_torchvision_names(read_state_dict(state_dict_or_path))
    norm = overrides.pop("norm", infer_norm(state_dict))
    norm_eps = overrides.pop("norm_eps", 1e-5 if norm == "bn" else 0.0)
    classes_in_file = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if classes_in_file is not None and classes_in_file.shape[0] != num_classes:
        raise ValueError(f"num_classes={num_classes}, but the weights score {classes_in_file.shape[0]} "
                         "classes (roi_heads.box_predictor.cls_score.weight); pass num_classes="
                         f"{classes_in_file.shape[0]}")
    config = torchvision_config(num_classes=num_classes, backbone=backbone, min_size=min_size,
                                max_size=max_size, norm=norm, norm_eps=norm_eps, **overrides)
    model = MaskRCNN(config)
    load_torchvision_state_dict(model, state_dict)
    return model.eval()


def replace_predictors(model, num_classes: int):
    """The torchvision tutorial's fine-tuning step: a model like ``model`` whose class scores,
    box deltas and mask logits are new layers for ``num_classes`` (background included);
    everything else keeps ``model``'s weights. Returns the new model (train mode)."""
    from minimrcnn.modeling.model import MaskRCNN

    config = dataclasses.replace(model.config, num_classes=int(num_classes))
    new_model = MaskRCNN(config)
    new_state = new_model.state_dict()
    kept = OrderedDict((k, v) for k, v in model.state_dict().items()
                       if k in new_state and v.shape == new_state[k].shape
                       and not k.startswith(("roi_heads.box_head.class_logits.", "roi_heads.box_head.box_deltas.",
                                             "roi_heads.mask_head.mask_logits.")))
    new_model.load_state_dict(kept, strict=False)
    return new_model.train()


# Config fields that describe torchvision's architecture and conventions: fine-tuning takes
# them from the weights' side and everything else (data sizes, solver, ...) from the run's config.
_SIZE_FIELDS = ("min_size", "min_size_test", "max_size")
ARCHITECTURE_FIELDS = tuple(key for key in TORCHVISION_DEFAULTS if key not in _SIZE_FIELDS + ("num_classes",)) \
    + ("backbone_width", "norm", "norm_eps")


def finetune_model(state_dict_or_path, config: Config, num_classes: int):
    """The torchvision tutorial's fine-tuning start: torchvision weights, new predictors.

    Builds torchvision's architecture (``ARCHITECTURE_FIELDS`` from :func:`torchvision_config`,
    ResNet depth from ``config.backbone_depth``; every other field, the solver and input
    sizes included, from ``config``), loads the weights and replaces the class scores, box
    deltas and mask logits with fresh layers for ``num_classes`` (background included).
    Returns ``(config of the new model, model in train mode)``.
    """
    from minimrcnn.modeling.model import MaskRCNN

    state_dict = current_torchvision_names(read_state_dict(state_dict_or_path))
    scores = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if scores is None:
        raise ValueError("torchvision weights: no roi_heads.box_predictor.cls_score.weight; "
                         "not a torchvision Mask R-CNN state dict")
    norm = infer_norm(state_dict)
    depth_name = f"resnet{config.backbone_depth}"
    architecture = torchvision_config(num_classes=scores.shape[0], backbone=depth_name, norm=norm,
                                      norm_eps=1e-5 if norm == "bn" else 0.0)
    source_config = dataclasses.replace(
        config, num_classes=scores.shape[0], backbone_weights=None,
        **{field: getattr(architecture, field) for field in ARCHITECTURE_FIELDS})
    model = MaskRCNN(source_config)
    load_torchvision_state_dict(model, state_dict)
    model = replace_predictors(model, num_classes)
    return model.config, model


def fit_briefly(model, dataset, steps: int, batch_size: int = 2, lr: float = 0.01, seed: int = 0):
    """A few plain SGD steps (momentum 0.9) of any detection model whose train-mode call
    ``model(images, targets)`` returns a dict of losses: torchvision's or this package's.

    Enough to make a freshly built model's outputs non-degenerate (scores that differ,
    boxes that moved) for comparisons; not a training recipe. Crowd and empty boxes are
    dropped from the targets. Returns the model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        indices = torch.randperm(len(dataset), generator=generator)[:batch_size].tolist()
        images, targets = [], []
        for index in indices:
            image, target = dataset[index]
            boxes = target["boxes"]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if "iscrowd" in target:
                keep &= target["iscrowd"] == 0
            images.append(image)
            targets.append({"boxes": boxes[keep], "labels": target["labels"][keep],
                            "masks": target["masks"][keep]})
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()
    return model.eval()


__all__ = ["ARCHITECTURE_FIELDS", "BACKBONES", "TORCHVISION_DEFAULTS", "TORCHVISION_KEYWORDS", "current_torchvision_names",
           "finetune_model", "fit_briefly", "from_torchvision", "infer_norm", "load_torchvision_state_dict", "read_state_dict",
           "replace_predictors", "torchvision_config"]
