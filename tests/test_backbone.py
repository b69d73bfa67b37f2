"""ResNet backbone: shapes and strides, torchvision layout, weight loading, freezing, norms."""

import dataclasses

import pytest
import torch
from torch import nn

from minimrcnn.config import get_config
from minimrcnn.modeling.backbone import ResNet, build_backbone, load_backbone_weights
from minimrcnn.modeling.norm import FrozenBatchNorm2d, freeze_batchnorm, group_norm, make_norm


def torchvision_resnet_layout(depth: int, width: int = 64, num_classes: int = 1000) -> dict:
    """Key -> shape of a torchvision ResNet state dict, written from torchvision's definition.

    Independent of minimrcnn: stem conv1 7x7 + bn1; layer_i of blocks; BasicBlock
    conv1/conv2 3x3; Bottleneck conv1 1x1, conv2 3x3, conv3 1x1 (x4); the first block of
    each layer gets downsample.0 (1x1 conv) + downsample.1 (bn) when the shape changes; fc.
    """
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    expansion = 1 if depth < 50 else 4
    layout = {}

    def add_bn(name, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.{suffix}"] = (channels,)
        layout[f"{name}.num_batches_tracked"] = ()

    layout["conv1.weight"] = (width, 3, 7, 7)
    add_bn("bn1", width)
    in_channels = width
    for layer_index, num_blocks in enumerate(blocks):
        planes = width * 2**layer_index
        for block_index in range(num_blocks):
            prefix = f"layer{layer_index + 1}.{block_index}"
            stride = 2 if (layer_index > 0 and block_index == 0) else 1
            if expansion == 1:
                layout[f"{prefix}.conv1.weight"] = (planes, in_channels, 3, 3)
                add_bn(f"{prefix}.bn1", planes)
                layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                add_bn(f"{prefix}.bn2", planes)
            else:
                layout[f"{prefix}.conv1.weight"] = (planes, in_channels, 1, 1)
                add_bn(f"{prefix}.bn1", planes)
                layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                add_bn(f"{prefix}.bn2", planes)
                layout[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
                add_bn(f"{prefix}.bn3", planes * 4)
            if stride != 1 or in_channels != planes * expansion:
                layout[f"{prefix}.downsample.0.weight"] = (planes * expansion, in_channels, 1, 1)
                add_bn(f"{prefix}.downsample.1", planes * expansion)
            in_channels = planes * expansion
    layout["fc.weight"] = (num_classes, in_channels)
    layout["fc.bias"] = (num_classes,)
    return layout


def random_state_dict(layout: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def test_torchvision_layout_counts_match_known_totals():
    # Known sizes of torchvision's state dicts (parameters + BN buffers + counters).
    assert len(torchvision_resnet_layout(18)) == 122
    assert len(torchvision_resnet_layout(50)) == 320


@pytest.mark.parametrize("depth", [18, 50])
def test_full_width_model_has_torchvision_names_and_shapes(depth):
    model = ResNet(depth, width=64, norm="bn")
    expected = {k: v for k, v in torchvision_resnet_layout(depth).items() if not k.startswith("fc.")}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize(
    "depth, expected_channels",
    [(18, [8, 16, 32, 64]), (34, [8, 16, 32, 64]), (50, [32, 64, 128, 256]), (101, [32, 64, 128, 256])],
)
def test_output_shapes_and_strides(depth, expected_channels):
    model = ResNet(depth, width=8, norm="bn").eval()
    height, width = 70, 97  # odd sizes: every stride-2 step rounds up (padding 1)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert model.out_channels == expected_channels
    assert model.strides == [4, 8, 16, 32]
    size_h, size_w = height, width
    sizes = []
    for _ in range(5):  # conv1, maxpool, layer2, layer3, layer4 each halve (ceil)
        size_h, size_w = (size_h + 1) // 2, (size_w + 1) // 2
        sizes.append((size_h, size_w))
    for output, channels, (h, w) in zip(outputs, expected_channels, sizes[1:]):
        assert tuple(output.shape) == (2, channels, h, w)


def test_bottleneck_puts_stride_on_3x3():
    model = ResNet(50, width=8, norm="bn")
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv3.stride == (1, 1)
    assert block.downsample[0].stride == (2, 2)


def test_frozen_batchnorm_equals_eval_batchnorm():
    torch.manual_seed(0)
    batchnorm = nn.BatchNorm2d(6)
    with torch.no_grad():
        batchnorm.weight.uniform_(0.5, 2)
        batchnorm.bias.normal_()
        batchnorm.running_mean.normal_()
        batchnorm.running_var.uniform_(0.2, 3)
    batchnorm.eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(batchnorm)
    features = torch.randn(3, 6, 5, 7)
    torch.testing.assert_close(frozen(features), batchnorm(features))
    # Loading a BatchNorm state dict (with its step counter) gives the same layer.
    other = FrozenBatchNorm2d(6)
    other.load_state_dict(batchnorm.state_dict())
    torch.testing.assert_close(other(features), batchnorm(features))
    assert list(frozen.parameters()) == []


def test_make_norm_kinds_and_errors():
    assert isinstance(make_norm("frozen_bn", 4), FrozenBatchNorm2d)
    assert isinstance(make_norm("bn", 4), nn.BatchNorm2d)
    norm = make_norm("gn", 16)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 16
    assert group_norm(256).num_groups == 32
    with pytest.raises(ValueError, match="norm"):
        make_norm("layer", 4)


@pytest.mark.parametrize("frozen_stages", [1, 2, 3])
def test_frozen_stages_get_no_gradient(frozen_stages):
    torch.manual_seed(0)
    model = ResNet(18, width=8, norm="bn", frozen_stages=frozen_stages)
    model.train()
    frozen_stats = model.layer1[0].bn1.running_mean.clone()
    sum(output.sum() for output in model(torch.randn(2, 3, 64, 64))).backward()
    stages = model.stages()
    for index, stage in enumerate(stages):
        for name, parameter in stage.named_parameters():
            if index <= frozen_stages:
                assert not parameter.requires_grad and parameter.grad is None, (index, name)
            else:
                assert parameter.requires_grad and parameter.grad is not None, (index, name)
    # Frozen stages' BatchNorms are frozen too: train mode does not move their statistics.
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(model.layer1[0].bn1.running_mean, frozen_stats)
    assert isinstance(model.layer4[0].bn1, nn.BatchNorm2d)


def test_all_stages_frozen():
    model = ResNet(18, width=8, norm="gn", frozen_stages=4)
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert isinstance(model.layer4[1].bn2, nn.GroupNorm)  # GroupNorm has no statistics to freeze


def test_freeze_batchnorm_keeps_outputs_in_eval():
    torch.manual_seed(0)
    model = ResNet(18, width=8, norm="bn")
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the running statistics away from 0 / 1
    model.eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        freeze_batchnorm(model)
        got = model(images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_zero_init_residual_zeroes_each_blocks_last_gamma():
    model = ResNet(50, width=8, norm="bn", zero_init_residual=True)
    assert all(float(block.bn3.weight.detach().abs().sum()) == 0 for block in model.layer3)
    assert float(model.layer3[0].bn2.weight.detach().abs().sum()) > 0


def test_loads_full_resnet50_state_dict(tmp_path):
    state = random_state_dict(torchvision_resnet_layout(50))
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = ResNet(50, width=64, norm="frozen_bn", frozen_stages=1)
    load_backbone_weights(model, path)
    loaded = model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], msg=key)
    assert not model.conv1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_loads_wrapped_state_dicts_for_each_norm(tmp_path, norm, wrapper):
    state = random_state_dict(torchvision_resnet_layout(18, width=8), seed=1)
    path = tmp_path / "r18.pt"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    model = ResNet(18, width=8, norm=norm)
    load_backbone_weights(model, path)
    torch.testing.assert_close(model.layer3[1].bn2.weight.detach(), state["layer3.1.bn2.weight"])
    torch.testing.assert_close(model.layer4[0].downsample[0].weight.detach(), state["layer4.0.downsample.0.weight"])
    if norm != "gn":
        torch.testing.assert_close(model.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])


def test_build_backbone_reads_config_and_weights(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(random_state_dict(torchvision_resnet_layout(18, width=16)), path)
    config = dataclasses.replace(get_config("shapes-cpu"), backbone_weights=str(path), frozen_stages=2)
    model = build_backbone(config)
    assert model.depth == 18 and model.out_channels == [16, 32, 64, 128]
    assert not model.layer2[0].conv1.weight.requires_grad and model.layer3[0].conv1.weight.requires_grad


def test_wrong_depth_lists_missing_keys(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(random_state_dict(torchvision_resnet_layout(50, width=8)), path)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(ResNet(101, width=8, norm="bn"), path)
    message = str(error.value)
    assert str(path) in message and "missing keys" in message and "layer3.22.conv1.weight" in message
    assert "unexpected" not in message


def test_extra_and_mismatched_keys_are_listed(tmp_path):
    state = random_state_dict(torchvision_resnet_layout(18, width=8))
    state["layer5.0.conv1.weight"] = torch.zeros(3)
    state["layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    del state["layer2.1.bn1.bias"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(ResNet(18, width=8, norm="bn"), path)
    message = str(error.value)
    assert "missing keys (1): layer2.1.bn1.bias" in message
    assert "unexpected keys (1): layer5.0.conv1.weight" in message
    assert "layer1.0.conv1.weight: file (8, 8, 1, 1) vs model (8, 8, 3, 3)" in message


def test_wrong_width_gives_shape_mismatches(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(random_state_dict(torchvision_resnet_layout(18, width=8)), path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone_weights(ResNet(18, width=16, norm="bn"), path)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_backbone_weights(ResNet(18, width=8), tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_backbone_weights(ResNet(18, width=8), garbage)
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="state dict"):
        load_backbone_weights(ResNet(18, width=8), not_a_dict)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"depth": 26}, "backbone_depth"), ({"width": 0}, "backbone_width"), ({"norm": "ln"}, "norm"),
     ({"frozen_stages": 5}, "frozen_stages")],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ResNet(**kwargs)


def test_channels_last_gives_same_outputs():
    torch.manual_seed(0)
    model = ResNet(18, width=8, norm="frozen_bn").eval()
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, expected):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
