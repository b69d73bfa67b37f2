"""Model and training configuration: one frozen dataclass and a few named presets.

A config is plain data. Modules take keyword arguments; the ``build_*`` functions
read the config. To vary a setting, use ``dataclasses.replace``::

    cfg = dataclasses.replace(get_config("shapes-cpu"), mask_loss="softmax")

Defaults are the standard Mask R-CNN R50-FPN settings (Detectron2's defaults,
He et al. 2017); the presets below scale them down for small images and CPUs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

@dataclass(frozen=True)
class Config:
    """Every knob of the model and of training. ``num_classes`` counts the background."""

    name: str = "coco-r50-fpn"

    # ---- data ----
    num_classes: int = 81  # 80 COCO thing classes + background (label 0)
    min_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)  # training short side, one drawn per batch
    min_size_test: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # images arrive in [0, 1], RGB
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisibility: int = 32  # pad the batch so every FPN level divides evenly
    hflip_prob: float = 0.5
    # Colour jitter in training (issue 13): brightness, contrast and saturation factors drawn
    # from [1 - s, 1 + s] per image; 0 (the paper: flips only) leaves the data untouched.
    color_jitter: float = 0.0

    # ---- backbone (ResNet, torchvision parameter layout) ----
    backbone_depth: int = 50  # 18, 34, 50 or 101
    backbone_width: int = 64  # channels of the stem; 64 is the standard ResNet
    frozen_stages: int = 1  # 0: train all; 1: freeze stem + res2 (standard with ImageNet weights)
    norm: str = "frozen_bn"  # "frozen_bn" (pretrained), "bn" or "gn" (from scratch)
    backbone_weights: str | None = None  # path to an ImageNet ResNet state dict on disk
    channels_last: bool = False  # NHWC convolutions; several times faster for small CPU models

    # ---- FPN ----
    fpn_channels: int = 256
    fpn_levels: tuple[int, ...] = (2, 3, 4, 5, 6)  # P6 is a stride-2 subsample of P5

    # ---- anchors and RPN ----
    anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512)  # one size per FPN level
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 2000  # per level
    rpn_pre_nms_topk_test: int = 1000  # per level
    rpn_post_nms_topk_train: int = 1000  # per image
    rpn_post_nms_topk_test: int = 1000  # per image
    rpn_nms_thresh: float = 0.7
    rpn_min_box_size: float = 0.0
    rpn_box_loss: str = "l1"  # "l1" or "smooth_l1"

    # ---- RoI heads ----
    # "align" (Mask R-CNN); ablations (Table 2c): "pool" (Faster R-CNN's RoIPool), "warp" (RoIPool's
    # quantized corners, then RoIAlign's bilinear average), "warp_max" and "align_max" (max over samples)
    roi_op: str = "align"
    roi_sampling_ratio: int = 0  # <= 0: adaptive, ceil(roi_size / output_size)
    roi_canonical_level: int = 4  # k0 in FPN Eqn. (1)
    roi_canonical_size: int = 224
    roi_fg_iou_thresh: float = 0.5
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    box_pool_size: int = 7
    box_head_dim: int = 1024
    box_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    box_loss: str = "l1"  # "l1" or "smooth_l1"
    classifier_loss_weight: float = 1.0  # multiplies the box head's cross-entropy; 1 in the paper

    # ---- mask head ----
    mask_head: str = "fcn"  # "fcn" (the paper) or "mlp" (fully connected; ablation)
    mask_loss: str = "sigmoid"  # "sigmoid" per class (the paper) or "softmax" across classes (ablation)
    mask_pool_size: int = 14
    mask_resolution: int = 28  # 28 (deconv x2 of 14) or 14 (no upsampling)
    mask_head_dim: int = 256
    mask_head_num_convs: int = 4

    # ---- panoptic: Panoptic FPN's semantic branch and the instance/stuff fusion ----
    semantic_head: bool = False  # off: plain Mask R-CNN; on: a semantic branch on P2..P5 (Panoptic FPN)
    num_stuff_classes: int = 53  # stuff categories (COCO panoptic: 53); semantic classes = 1 thing + these
    semantic_channels: int = 128  # the branch's width; the paper found 64/128/256 nearly equal
    semantic_loss_weight: float = 0.5  # lambda_s; Detectron2's panoptic configs: 0.5 (instance losses 1.0)
    panoptic_score_thresh: float = 0.5  # fusion: instances below this score are not placed
    panoptic_overlap_thresh: float = 0.5  # fusion: drop an instance with more of its mask already taken
    panoptic_stuff_area_thresh: int = 4096  # fusion: a stuff region needs this many free pixels
    # ---- ablation switches (Table 2 of the paper; the defaults are the paper's model) ----
    mask_class_agnostic: bool = False  # True: one mask channel shared by all classes (Table 2b, 29.7 AP)
    # False: no FPN, the "C4" design as a single stride-16 map: res4 (C4) through a 1x1 conv to
    # fpn_channels; the RPN puts every anchor size on it and the RoI heads pool from it (the paper's
    # C4 also moves res5 into the RoI head; we keep the heads as they are).
    backbone_fpn: bool = True

    # ---- inference ----
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    mask_thresh: float = 0.5

    # ---- torchvision compatibility (minimrcnn/interop.py documents every switch in one table;
    # ---- the defaults are this package's Detectron2 conventions, the comments name torchvision's) ----
    resize_rule: str = "round"  # "round": side * scale rounded; "torchvision": floored (scale_factor), boxes back by float32 ratios
    anchor_offset: float = 0.5  # anchor centres at (index + offset) * stride; torchvision 0.0
    anchor_rounding: bool = False  # torchvision True: integer cell anchors, stride = padded size // grid size
    norm_eps: float = 1e-5  # BatchNorm eps; torchvision's pretrained FrozenBatchNorm2d uses 0.0
    box_min_size: float = 0.0  # detections need w, h above this; torchvision 1e-2
    # "torchvision": size filters keep w, h >= min (remove_small_boxes), NMS with its batched_nms
    # arithmetic per image, proposals ranked by sigmoid probability instead of logit
    box_filtering: str = "detectron2"
    roi_aligned: bool = True  # RoIAlign half-pixel offset (Detectron2); torchvision False
    roi_level_mapper: str = "detectron2"  # "torchvision": floor(k0 + log2(sqrt(area) / s0) + 1e-6)
    mask_paste: str = "detectron2"  # "torchvision": padded mask, expanded integer box, resized bilinearly

    # ---- solver ----
    batch_size: int = 16  # images per iteration, summed over all processes
    base_lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iter: int = 90_000
    lr_schedule: str = "step"  # "step" or "cosine"
    lr_steps: tuple[float, ...] = (60_000 / 90_000, 80_000 / 90_000)  # fractions of max_iter
    lr_gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    grad_accum_steps: int = 1
    amp: str = "none"  # "none", "bf16" or "fp16" (CUDA only)
    checkpoint_period: int = 5000
    seed: int = 0
    num_workers: int = 4
    # GPU speed (issue 12 item 5): pad the mask head's RoI batch to a multiple of this, repeating
    # its first RoI and dropping the padding's logits (the same losses and gradients), so that its
    # convolutions see a few shapes and cudnn.benchmark tunes each once; 0 = off (no padding)
    mask_roi_bucket: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PRESETS: dict[str, Config] = {}


def _register(config: Config) -> Config:
    _PRESETS[config.name] = config
    return config


_register(Config())

# ResNet-50-FPN on the shapes set: the standard architecture, trained from scratch
# (no download possible), with GroupNorm and a shorter schedule for 128 x 128 images.
_register(
    Config(
        name="shapes-gpu",
        num_classes=5,
        mask_roi_bucket=64,  # fixed 128 x 128 images: with this, every conv sees few shapes (cudnn.benchmark)
        min_size=(128,),
        min_size_test=128,
        max_size=128,
        backbone_depth=50,
        frozen_stages=0,
        norm="gn",
        anchor_sizes=(8, 16, 32, 64, 128),
        rpn_pre_nms_topk_train=1000,
        rpn_pre_nms_topk_test=500,
        rpn_post_nms_topk_train=500,
        rpn_post_nms_topk_test=300,
        roi_batch_size_per_image=256,
        roi_canonical_size=56,
        batch_size=16,
        base_lr=0.02,
        max_iter=6000,
        lr_schedule="cosine",
        warmup_iters=300,
        grad_clip=10.0,
        amp="bf16",
        checkpoint_period=1000,
    )
)

# A narrow ResNet-18 FPN sized for 128 x 128 shapes images and a 2-core CPU.
_register(
    Config(
        name="shapes-cpu",
        num_classes=5,
        min_size=(128,),
        min_size_test=128,
        max_size=128,
        hflip_prob=0.5,
        backbone_depth=18,
        backbone_width=16,
        frozen_stages=0,
        norm="bn",
        channels_last=True,
        # 32 FPN channels and a 32-channel mask head: on 2 cores the budget buys iterations, and the
        # mask head's convolutions over every foreground RoI were the largest cost of a step. At the
        # main job's budget this gave +16 segm AP on a hexagon variant over 64/64, and more on
        # the default set (bench/RESULTS.md, "... a recipe that generalizes").
        fpn_channels=32,
        fpn_levels=(2, 3, 4, 5),
        anchor_sizes=(12, 24, 48, 96),
        rpn_batch_size_per_image=128,
        rpn_pre_nms_topk_train=600,
        rpn_pre_nms_topk_test=300,
        rpn_post_nms_topk_train=200,
        rpn_post_nms_topk_test=100,
        roi_batch_size_per_image=64,
        # Boxes under 56 px (most shapes are 9-64 px) pool from P2, the stride-4 map; with 56, those
        # of 28-55 px pooled from P3's 8-px cells: +3.8 and +5.0 segm AP, +2.6 and +2.8 box AP on
        # the hexagon tuning set, 2 seeds (bench/RESULTS.md, "Which pyramid level").
        roi_canonical_size=112,
        roi_canonical_level=4,
        box_head_dim=256,
        # Twice the classifier's cross-entropy: small hexagons and circles were confused more than
        # mislocated. On the hexagon tuning set +3.3 segm AP and the class-agnostic gap 5.6 -> 3.4
        # points; on a variant not tuned on 6.4 -> 4.6 (2 seeds each, bench/RESULTS.md).
        classifier_loss_weight=2.0,
        mask_head_dim=32,
        mask_head_num_convs=2,
        # 14 x 14 masks (no deconvolution): a cell is at most 4 pixels of a shape here, and at
        # equal wall-clock time on 2 cores it gave +10 segm AP over 28 x 28 (bench/RESULTS.md).
        mask_resolution=14,
        batch_size=8,
        base_lr=0.04,
        max_iter=1500,
        lr_schedule="cosine",
        warmup_iters=100,
        grad_clip=10.0,
        checkpoint_period=500,
        num_workers=0,
    )
)


# The same models with Panoptic FPN's semantic branch, trained jointly with the instance heads
# (the main job uses these). Shapes has 2 stuff categories (sky, ground).
#  - semantic_channels: the paper's 128 is half of its 256 FPN channels; shapes-cpu's branch keeps
#    32, as wide as its FPN (the paper saw 64/128/256 nearly equal, and 16 would save little: the
#    branch is about a tenth of a step).
#  - panoptic_stuff_area_thresh: Detectron2's 4096 pixels is 1.3 % of a 640 x 480 COCO image but a
#    quarter of a 128 x 128 shapes image, and 5 % of the true sky/ground regions of shapes train are
#    smaller than 3835 pixels (the smallest: 864). 256 pixels (1/64 of the image, about COCO's
#    fraction) still removes the speckles of a wrong argmax and keeps every real stuff region.
_SHAPES_PANOPTIC = {"semantic_head": True, "num_stuff_classes": 2, "panoptic_stuff_area_thresh": 256}
_register(dataclasses.replace(_PRESETS["shapes-cpu"], name="shapes-cpu-panoptic", semantic_channels=32,
                              **_SHAPES_PANOPTIC))
_register(dataclasses.replace(_PRESETS["shapes-gpu"], name="shapes-gpu-panoptic", **_SHAPES_PANOPTIC))


def get_config(name_or_path: str) -> Config:
    """A named preset (``shapes-cpu``, ``shapes-gpu``, ``coco-r50-fpn``) or a JSON file of overrides.

    A JSON file may name a ``base`` preset and override any field::

        {"base": "shapes-cpu", "mask_loss": "softmax", "max_iter": 300}
    """
    if name_or_path in _PRESETS:
        return _PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"unknown config {name_or_path!r}: expected one of {sorted(_PRESETS)} or a JSON file"
        )
    try:
        overrides = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    base = _PRESETS.get(overrides.pop("base", "coco-r50-fpn"))
    if base is None:
        raise ValueError(f"{path}: 'base' must be one of {sorted(_PRESETS)}")
    known = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown config fields {unknown}")
    for key, value in overrides.items():
        if isinstance(value, list):
            overrides[key] = tuple(value)
    return dataclasses.replace(base, name=str(path.stem), **overrides)


def list_configs() -> list[str]:
    return sorted(_PRESETS)


__all__ = ["Config", "get_config", "list_configs"]
