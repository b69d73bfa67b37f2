"""ResNet backbone (He et al. 2016) returning the feature maps C2..C5.

Parameter names and shapes follow torchvision's ResNet exactly (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so an ImageNet state dict saved
from torchvision loads with ``load_backbone_weights`` (its ``fc.*`` keys are
ignored: detection has no classifier). ``width`` scales every stage (64 is the
standard ResNet; the CPU preset uses 16).

Shape shorthand:
    N: images, H, W: padded image size, w: stem width (64 standard)
    C2: [N, c2, H/4,  W/4]    c2 = w   (basic) or 4w  (bottleneck)
    C3: [N, c3, H/8,  W/8]    c3 = 2w  (basic) or 8w
    C4: [N, c4, H/16, W/16]   c4 = 4w  (basic) or 16w
    C5: [N, c5, H/32, W/32]   c5 = 8w  (basic) or 32w
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minimrcnn.modeling.norm import BATCHNORM_EPS, NORM_KINDS, FrozenBatchNorm2d, freeze_batchnorm, make_norm

# Blocks per stage (layer1..layer4) for each supported depth.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_STRIDES = (4, 8, 16, 32)  # output stride of C2..C5
NUM_STAGES = 4


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus the identity (ResNet-18/34).

    features: [N, in_channels, H, W] -> [N, planes, H/stride, W/stride]
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(in_channels, planes, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        identity = features if self.downsample is None else self.downsample(features)
        out = self.relu(self.bn1(self.conv1(features)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) plus the identity (ResNet-50/101).

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5"),
    not on the first 1x1 as in the original paper and Caffe weights.

    features: [N, in_channels, H, W] -> [N, 4 * planes, H/stride, W/stride]
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, norm: str = "bn"):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(in_channels, out_channels, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        identity = features if self.downsample is None else self.downsample(features)
        out = self.relu(self.bn1(self.conv1(features)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    """A 1x1 projection (``downsample.0`` conv, ``downsample.1`` norm) when the shape changes, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        make_norm(norm, out_channels),
    )


class ResNet(nn.Module):
    """ResNet trunk without the classifier; ``forward`` returns ``[C2, C3, C4, C5]``.

    Args:
        depth: 18, 34, 50 or 101.
        width: channels of the stem (64 for the standard ResNet); every stage scales with it.
        norm: "frozen_bn", "bn" or "gn".
        frozen_stages: 0 trains everything; k >= 1 freezes the stem and layer1..layer_k
            (their parameters get ``requires_grad=False`` and their BatchNorms become frozen).
        zero_init_residual: start each block's last norm at gamma = 0, so every block begins
            as the identity (helps training from scratch; Goyal et al. 2017).

    Attributes:
        out_channels: channels of C2..C5.
        strides: (4, 8, 16, 32).
    """

    def __init__(
        self,
        depth: int = 50,
        width: int = 64,
        norm: str = "frozen_bn",
        frozen_stages: int = 0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(
                f"backbone_depth: {depth!r} not supported; expected one of {sorted(STAGE_BLOCKS)}"
            )
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"backbone_width: expected a positive int, got {width!r}")
        if norm not in NORM_KINDS:
            raise ValueError(f"norm: unknown kind {norm!r}; expected one of {NORM_KINDS}")
        if not 0 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f"frozen_stages: expected 0..{NUM_STAGES}, got {frozen_stages!r}")
        block = BasicBlock if depth < 50 else Bottleneck
        self.depth = depth

        # Stem: 7x7 stride-2 conv and 3x3 stride-2 max-pool; together stride 4.
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = width
        self.out_channels: list[int] = []
        for stage_index, num_blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = width * 2**stage_index
            first_stride = 1 if stage_index == 0 else 2  # layer1 keeps the stem's stride 4
            blocks = []
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                blocks.append(block(in_channels, planes, stride, norm))
                in_channels = planes * block.expansion
            self.add_module(f"layer{stage_index + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self.strides = list(STAGE_STRIDES)

        self._init_weights(zero_init_residual)
        self.frozen_stages = frozen_stages
        self._freeze(frozen_stages)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init for ReLU nets; fan_out as torchvision.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_norm.weight)

    def stages(self) -> list[nn.Module]:
        """Stage 0 (the stem: conv1 + bn1) and stages 1..4 (layer1..layer4)."""
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze(self, frozen_stages: int) -> None:
        if frozen_stages == 0:
            return
        # The stem and layer1..layer_k stop learning.
        for stage in self.stages()[: frozen_stages + 1]:
            for parameter in stage.parameters():
                parameter.requires_grad_(False)
        self.bn1 = freeze_batchnorm(self.bn1)
        for stage_index in range(1, frozen_stages + 1):
            freeze_batchnorm(getattr(self, f"layer{stage_index}"))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [N, 3, H, W] (normalized) -> [C2, C3, C4, C5] at strides 4, 8, 16, 32."""
        features = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            features = stage(features)
            outputs.append(features)
        return outputs


def _unwrap_state_dict(loaded, path: Path) -> dict:
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), or one under 'state_dict'/'model'")
    # Checkpoints saved from nn.DataParallel prefix every name with "module.".
    if loaded and all(key.startswith("module.") for key in loaded):
        loaded = {key[len("module.") :]: value for key, value in loaded.items()}
    return loaded


def load_backbone_weights(model: ResNet, path: str | Path) -> ResNet:
    """Load a torchvision-layout ResNet state dict from ``path`` into ``model``; returns it.

    Ignored: ``fc.*`` (the ImageNet classifier), ``num_batches_tracked`` counters, and
    BatchNorm running statistics when the model uses GroupNorm (only the affine
    weight/bias carry over). Anything else that is missing, unexpected or of the wrong
    shape raises a ValueError that lists it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backbone_weights: no such file {str(path)!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise ValueError(f"{path}: could not be read as a torch state dict ({exc})") from exc
    file_state = _unwrap_state_dict(loaded, path)
    model_state = model.state_dict()

    # GroupNorm has no running statistics: the file's BatchNorm ones are dropped.
    group_norm_names = {name for name, module in model.named_modules() if isinstance(module, nn.GroupNorm)}

    def is_optional(key: str) -> bool:
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            return True
        module_name, _, buffer_name = key.rpartition(".")
        return buffer_name in ("running_mean", "running_var") and module_name in group_norm_names

    missing = sorted(k for k in model_state if k not in file_state and not is_optional(k))
    unexpected = sorted(k for k in file_state if k not in model_state and not is_optional(k))
    mismatched = sorted(
        f"{k}: file {tuple(file_state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in file_state
        if k in model_state and file_state[k].shape != model_state[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        sections = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, keys in sections:
            if keys:
                problems.append(f"{title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError(
            f"{path}: does not fit a ResNet-{model.depth} with these settings; " + "; ".join(problems)
        )
    to_load = {k: v for k, v in file_state.items() if k in model_state}
    model.load_state_dict(to_load, strict=False)
    return model


def build_backbone(config) -> ResNet:
    """The ResNet of ``config`` (backbone_depth, backbone_width, norm, norm_eps, frozen_stages,
    backbone_weights)."""
    model = ResNet(
        depth=config.backbone_depth,
        width=config.backbone_width,
        norm=config.norm,
        frozen_stages=config.frozen_stages,
    )
    if config.norm_eps != BATCHNORM_EPS:
        set_batchnorm_eps(model, config.norm_eps)
    if config.backbone_weights:
        load_backbone_weights(model, config.backbone_weights)
    return model


def set_batchnorm_eps(model: nn.Module, eps: float) -> None:
    """Give every BatchNorm (trainable or frozen) inside ``model`` the epsilon ``eps``.

    torchvision sets 0.0 on the FrozenBatchNorm2d layers of its pretrained detectors;
    reproducing their outputs needs the same value.
    """
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            module.eps = float(eps)


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_backbone", "load_backbone_weights", "set_batchnorm_eps"]
