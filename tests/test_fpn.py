"""FPN: shapes for odd sizes, the top-down merge by hand, extra levels, level subsets."""

import dataclasses

import numpy as np
import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.modeling.backbone import ResNet
from minimrcnn.modeling.fpn import FPN, build_fpn


def backbone_like_maps(channels, height, width, batch=2, seed=0):
    """Random [C2..C5] with the sizes a ResNet gives for an image of height x width."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for level in range(2, 6):
        stride = 2**level
        h, w = -(-height // stride), -(-width // stride)
        maps.append(torch.randn(batch, channels[level - 2], h, w, generator=generator))
    return maps


@pytest.mark.parametrize("height, width", [(64, 64), (97, 71), (33, 130)])
def test_shapes_for_odd_sizes(height, width):
    backbone = ResNet(18, width=8, norm="bn").eval()
    fpn = FPN(backbone.out_channels, out_channels=16, levels=(2, 3, 4, 5, 6))
    with torch.no_grad():
        backbone_maps = backbone(torch.randn(1, 3, height, width))
        pyramid = fpn(backbone_maps)
    assert fpn.strides == [4, 8, 16, 32, 64]
    assert len(pyramid) == 5
    for p_map, c_map in zip(pyramid[:4], backbone_maps):
        assert p_map.shape == (1, 16, *c_map.shape[-2:])
    p5 = pyramid[3]
    assert pyramid[4].shape == (1, 16, (p5.shape[2] + 1) // 2, (p5.shape[3] + 1) // 2)
    torch.testing.assert_close(pyramid[4], p5[:, :, ::2, ::2])  # P6 keeps every other cell of P5


def identity_fpn(channels: int, levels) -> FPN:
    """An FPN whose 1x1 laterals and 3x3 outputs are identities, so P_l = C_l + up(P_{l+1})."""
    fpn = FPN([channels] * 4, out_channels=channels, levels=levels)
    with torch.no_grad():
        for conv in fpn.lateral_convs:
            conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            conv.bias.zero_()
        for conv in fpn.output_convs:
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(channels)
            conv.bias.zero_()
    return fpn


def nearest_upsample_numpy(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's 'nearest': output cell (i, j) reads input (floor(i * in_h / out_h), floor(j * in_w / out_w))."""
    in_h, in_w = array.shape
    rows = [int(np.floor(i * in_h / out_h)) for i in range(out_h)]
    cols = [int(np.floor(j * in_w / out_w)) for j in range(out_w)]
    return array[np.ix_(rows, cols)]


def test_top_down_merge_against_numpy():
    maps = backbone_like_maps([1, 1, 1, 1], 100, 75, batch=1)
    fpn = identity_fpn(1, (2, 3, 4, 5))
    with torch.no_grad():
        pyramid = fpn(maps)
    expected = maps[3][0, 0].double().numpy()
    for level_index in (3, 2, 1, 0):
        if level_index < 3:
            c_map = maps[level_index][0, 0].double().numpy()
            expected = c_map + nearest_upsample_numpy(expected, *c_map.shape)
        np.testing.assert_allclose(pyramid[level_index][0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_coarse_levels_do_not_see_fine_ones():
    fpn = FPN([4, 8, 16, 32], out_channels=8, levels=(2, 3, 4, 5, 6))
    maps = backbone_like_maps([4, 8, 16, 32], 64, 64)
    with torch.no_grad():
        before = fpn(maps)
        maps[0] = maps[0] + 1.0  # change C2 only
        after = fpn(maps)
    assert not torch.allclose(before[0], after[0])
    for level_index in range(1, 5):
        torch.testing.assert_close(before[level_index], after[level_index])


def test_level_subset_starting_at_p3():
    fpn = FPN([4, 8, 16, 32], out_channels=8, levels=(3, 4, 5, 6))
    assert fpn.strides == [8, 16, 32, 64] and len(fpn.lateral_convs) == 3
    maps = backbone_like_maps([4, 8, 16, 32], 96, 96)
    with torch.no_grad():
        pyramid = fpn(maps)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(12, 12), (6, 6), (3, 3), (2, 2)]


def test_two_extra_levels():
    fpn = FPN([4, 8, 16, 32], out_channels=8, levels=(4, 5, 6, 7))
    with torch.no_grad():
        pyramid = fpn(backbone_like_maps([4, 8, 16, 32], 128, 128))
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(8, 8), (4, 4), (2, 2), (1, 1)]


def test_build_fpn_from_config():
    config = get_config("shapes-cpu")
    fpn = build_fpn(config, [16, 32, 64, 128])
    assert fpn.levels == (2, 3, 4, 5) and fpn.out_channels == config.fpn_channels == 32
    full = build_fpn(dataclasses.replace(config, fpn_levels=(2, 3, 4, 5, 6), fpn_channels=32), [16, 32, 64, 128])
    assert full.strides == [4, 8, 16, 32, 64] and full.out_channels == 32


@pytest.mark.parametrize("levels", [(), (1, 2, 3), (2, 4, 5), (5, 4), (6, 7)])
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="fpn_levels"):
        FPN([4, 8, 16, 32], out_channels=8, levels=levels)


def test_bad_inputs():
    with pytest.raises(ValueError, match="backbone_channels"):
        FPN([4, 8, 16], out_channels=8)
    fpn = FPN([4, 8, 16, 32], out_channels=8)
    with pytest.raises(ValueError, match="backbone_features"):
        fpn(backbone_like_maps([4, 8, 16, 32], 64, 64)[:3])


def test_channels_last_gives_same_pyramid():
    fpn = FPN([4, 8, 16, 32], out_channels=8, levels=(2, 3, 4, 5, 6))
    maps = backbone_like_maps([4, 8, 16, 32], 90, 70)
    with torch.no_grad():
        expected = fpn(maps)
        fpn = fpn.to(memory_format=torch.channels_last)
        got = fpn([m.contiguous(memory_format=torch.channels_last) for m in maps])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
