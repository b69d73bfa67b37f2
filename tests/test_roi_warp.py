"""Tests for minimrcnn.ops.roi_warp: RoIWarp (quantized corners) and the max over samples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from minimrcnn.ops.roi_align import roi_align
from minimrcnn.ops.roi_warp import RoIWarp, c_round, roi_warp, roi_warp_backward_reference, roi_warp_reference

COMBOS = [(quantize, reduction) for quantize in (True, False) for reduction in ("avg", "max")]
# Detectron2's test_forward_output: arange(25) as 5 x 5, box [1, 1, 3, 3], 4 x 4, ratio 0, unaligned.
ARANGE_BOX_1133_UNALIGNED = [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]]


def edge_rois(generator, num_rois, num_images, height, width, spatial_scale):
    """[num_rois, 5] float64 RoIs in image coordinates: ordinary boxes, boxes under a pixel, boxes
    several times the map, boxes wholly outside, zero-width and zero-height boxes, and corners on
    half pixels of the feature grid (where C rounding and round-half-even differ)."""
    image_h, image_w = height / spatial_scale, width / spatial_scale
    corner = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    size = torch.rand(num_rois, 2, generator=generator, dtype=torch.float64) * 0.8
    kind = torch.arange(num_rois) % 7
    size[kind == 1] *= 0.02
    size[kind == 2] += 2.0
    corner[kind == 3] += 1.5
    size[kind == 4, 0] = 0.0
    size[kind == 5, 1] = 0.0
    scale = torch.tensor([image_w, image_h, image_w, image_h], dtype=torch.float64)
    boxes = torch.cat([corner, corner + size], dim=1) * scale
    half = kind == 6  # corners at k + 0.5 feature pixels, k of both signs
    boxes[half] = (torch.floor(boxes[half] * spatial_scale) + 0.5) / spatial_scale
    batch_index = torch.randint(num_images, (num_rois, 1), generator=generator).double()
    return torch.cat([batch_index, boxes], dim=1)


def test_c_round_sends_halves_away_from_zero():
    assert [c_round(v) for v in (2.5, -2.5, 0.5, -0.5, 1.49, -1.51)] == [3, -3, 1, -1, 1, -2]


@pytest.mark.parametrize("aligned", [True, False])
def test_quantized_corners_are_rounded_as_roi_pool_rounds_them(aligned):
    """Box (1.3, 0.6, 3.4, 2.5) at scale 1 quantizes to (1, 1, 3, 3): 2.5 goes up (C), not to 2 (even)."""
    features = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5)
    box = torch.tensor([[0, 1.3, 0.6, 3.4, 2.5]], dtype=torch.float64)
    snapped = torch.tensor([[0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    warped = roi_warp(features, box, 4, 1.0, 0, aligned, quantize=True)
    assert torch.equal(warped, roi_align(features, snapped, 4, 1.0, 0, aligned))
    if not aligned:
        assert warped[0, 0].tolist() == ARANGE_BOX_1133_UNALIGNED
    # scale 0.5: 5.0 * 0.5 = 2.5 -> 3 as well
    scaled = roi_warp(features, torch.tensor([[0, 2.6, 1.2, 6.8, 5.0]], dtype=torch.float64), 4, 0.5, 0, aligned)
    assert torch.equal(scaled, warped)


def test_max_and_avg_of_a_hand_case_with_their_gradients():
    """One 1 x 1 bin over [0, 4]^2 of arange(25), 2 x 2 samples at rows/cols 1 and 3 (unaligned):
    values 6, 8, 16, 18 -> avg 12, max 18; max's gradient goes to pixel (3, 3) only."""
    features = torch.arange(25, dtype=torch.float64).reshape(1, 1, 5, 5).requires_grad_()
    box = torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float64)
    for backend in ("numba", "reference"):
        assert roi_warp(features, box, 1, 1.0, 2, False, True, "avg", backend).item() == 12.0
        output = roi_warp(features, box, 1, 1.0, 2, False, True, "max", backend)
        assert output.item() == 18.0
        (grad,) = torch.autograd.grad(output.sum(), features)
        expected = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
        expected[0, 0, 3, 3] = 1.0
        assert torch.equal(grad, expected)


def test_max_counts_outside_samples_as_zero_and_ties_go_to_the_first_sample():
    """All-negative map: a bin half outside the map has max 0 (an outside sample) and no gradient;
    a constant map ties every sample, and the first one in (iy, ix) order takes the gradient."""
    negative = -torch.ones(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    half_outside = torch.tensor([[0, -8.0, 0.5, 2.0, 2.5]], dtype=torch.float64)  # x samples at -4.5 and -0.5
    output = roi_warp(negative, half_outside, 1, 1.0, 2, False, False, "max", "numba")
    assert output.item() == 0.0
    (grad,) = torch.autograd.grad(output.sum(), negative)
    assert not grad.any()
    constant = torch.ones(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    box = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)  # samples at 1 and 3: whole pixels
    for backend in ("numba", "reference"):
        (grad,) = torch.autograd.grad(roi_warp(constant, box, 1, 1.0, 2, False, False, "max", backend).sum(),
                                      constant)
        assert grad[0, 0, 1, 1] == 1.0 and grad.sum() == 1.0, backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 0.0625])
def test_numba_matches_the_reference_in_values_and_gradients(dtype, spatial_scale):
    generator = torch.Generator().manual_seed(int(spatial_scale * 64))
    features = torch.randn(2, 3, 6, 7, generator=generator, dtype=dtype)
    rois = edge_rois(generator, 14, 2, 6, 7, spatial_scale).to(dtype)
    grad_output = torch.randn(14, 3, 2, 3, generator=generator, dtype=torch.float64)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for sampling_ratio in (-1, 0, 2):
        for aligned in (True, False):
            for quantize, reduction in COMBOS:
                args = ((2, 3), spatial_scale, sampling_ratio, aligned, quantize, reduction)
                leaf = features.clone().requires_grad_()
                output = roi_warp(leaf, rois, *args, backend="numba")
                output.backward(grad_output.to(dtype))
                expected = roi_warp_reference(features.numpy(), rois.numpy(), *args)
                expected_grad = roi_warp_backward_reference(features.numpy(), grad_output.numpy(), rois.numpy(), *args)
                where = f"ratio {sampling_ratio}, aligned {aligned}, quantize {quantize}, {reduction}"
                assert output.dtype == dtype and leaf.grad.dtype == dtype
                np.testing.assert_allclose(output.detach().double().numpy(), expected, atol=tolerance, err_msg=where)
                np.testing.assert_allclose(leaf.grad.double().numpy(), expected_grad, atol=10 * tolerance,
                                           err_msg=where)


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_over_several_channel_blocks_matches_the_reference(channels_last):
    """The CPU forward reads channels-last in blocks of CHANNEL_BLOCK: a channel count past one
    block (and a tie between two samples in every channel) must still equal the reference."""
    from minimrcnn.ops.roi_warp import CHANNEL_BLOCK

    generator = torch.Generator().manual_seed(11)
    features = torch.randn(2, CHANNEL_BLOCK + 5, 6, 7, generator=generator, dtype=torch.float64)
    features[1, :, 2] = features[1, :, 3]  # two equal rows: ties between samples
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    rois = edge_rois(generator, 12, 2, 6, 7, 0.5)
    grad_output = torch.randn(12, CHANNEL_BLOCK + 5, 2, 3, generator=generator, dtype=torch.float64)
    for quantize in (True, False):
        args = ((2, 3), 0.5, 0, True, quantize, "max")
        leaf = features.clone().requires_grad_()
        output = roi_warp(leaf, rois, *args, backend="numba")
        output.backward(grad_output)
        np.testing.assert_allclose(output.detach().numpy(), roi_warp_reference(features.numpy(), rois.numpy(), *args),
                                   atol=1e-12)
        np.testing.assert_allclose(leaf.grad.numpy(), roi_warp_backward_reference(
            features.numpy(), grad_output.numpy(), rois.numpy(), *args), atol=1e-11)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_without_quantization_and_with_avg_it_is_roi_align(spatial_scale):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 8, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = edge_rois(generator, 21, 2, 8, 9, spatial_scale)
    for sampling_ratio in (-1, 2):
        for aligned in (True, False):
            warped = roi_warp(features, rois, 3, spatial_scale, sampling_ratio, aligned, False, "avg")
            aligned_out = roi_align(features, rois, 3, spatial_scale, sampling_ratio, aligned)
            torch.testing.assert_close(warped, aligned_out, rtol=0, atol=1e-12)
            grads = [torch.autograd.grad(out.sum(), features)[0] for out in (warped, aligned_out)]
            torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_quantization_changes_the_output_of_a_fractional_box():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(1, 2, 8, 8, generator=generator, dtype=torch.float64)
    box = torch.tensor([[0, 5.3, 6.1, 21.7, 25.9]], dtype=torch.float64)  # at 1/4: 1.325 .. 6.475
    assert not torch.allclose(roi_warp(features, box, 2, 0.25, quantize=True),
                              roi_warp(features, box, 2, 0.25, quantize=False))


@pytest.mark.parametrize("quantize,reduction", COMBOS)
def test_gradcheck_float64(quantize, reduction):
    generator = torch.Generator().manual_seed(5)
    # random values in [1, 2]: above the 0 of outside samples, and no two samples of a bin within
    # the finite-difference step (integer-valued maps tie: (3 + 8) / 2 == (5 + 6) / 2)
    features = (1 + torch.rand(2, 2, 6, 7, generator=generator, dtype=torch.float64)).requires_grad_()
    rois = torch.tensor([[0, 1.3, 2.2, 17.9, 20.4], [1, 0.0, 0.0, 27.0, 23.0], [1, 9.6, 3.1, 14.2, 11.7],
                         [0, -6.0, 14.0, 6.0, 30.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: roi_warp(f, rois, (2, 3), 0.25, 2, True, quantize, reduction), (features,)
    )


@pytest.mark.parametrize("reduction", ["avg", "max"])
def test_outside_samples_do_not_read_the_map_and_no_rois_give_an_empty_output(reduction):
    infinite = torch.full((2, 2, 5, 6), float("inf"), dtype=torch.float64)
    outside = torch.tensor([[0, -30, -30, -10, -10], [1, 40, 2, 60, 4]], dtype=torch.float64)
    assert not roi_warp(infinite, outside, 2, 1.0, 2, reduction=reduction).any()
    leaf = torch.ones(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    output = roi_warp(leaf, torch.zeros(0, 5, dtype=torch.float64), (2, 3), reduction=reduction)
    output.sum().backward()
    assert output.shape == (0, 2, 2, 3) and not leaf.grad.any()


def test_module_and_bad_arguments():
    features = torch.rand(1, 2, 4, 4)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
    module = RoIWarp(2, 1.0, 2, quantize=True, reduction="max")
    assert torch.equal(module(features, rois), roi_warp(features, rois, 2, 1.0, 2, True, True, "max"))
    assert "reduction='max'" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        roi_warp(features, rois, 2, reduction="mean")
    with pytest.raises(TypeError, match="rois dtype"):
        roi_warp(features, rois.double(), 2)
    with pytest.raises(TypeError, match="sampling_ratio"):
        roi_warp(features, rois, 2, sampling_ratio=1.5)


_SIMULATOR_CHECK = """
import json, torch
from minimrcnn.ops.roi_warp import roi_warp
g = torch.Generator().manual_seed(0)
f = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64)
rois = torch.tensor([[0, 1.3, 0.6, 13.4, 9.5], [1, -4.0, 2.0, 6.0, 30.0], [1, 30.0, 30.0, 40.0, 40.0],
                     [0, 4.0, 4.0, 4.0, 9.0]], dtype=torch.float64)
errors = {}
cases = [(torch.float64, quantize, reduction, ratio) for quantize in (True, False) for reduction in ("avg", "max")
         for ratio in (0, 2)]
cases += [(torch.float32, quantize, "max", ratio) for quantize in (True, False) for ratio in (0, 2)]
for dtype, quantize, reduction, ratio in cases:
    results = []
    for backend in ("cuda", "reference"):
        leaf = f.to(dtype).clone().requires_grad_()
        # the float32 cases read a channels_last map (the kernels take a contiguous copy)
        source = leaf.contiguous(memory_format=torch.channels_last) if dtype == torch.float32 else leaf
        out = roi_warp(source, rois.to(dtype), (2, 2), 0.5, ratio, True, quantize, reduction, backend)
        out.backward(torch.arange(out.numel(), dtype=dtype).reshape(out.shape))
        assert out.dtype == leaf.grad.dtype == dtype
        results.append((out.detach().double(), leaf.grad.double()))
    key = f"{str(dtype)[6:]}-{quantize}-{reduction}-{ratio}"
    errors[key] = max(float((results[0][i] - results[1][i]).abs().max()) for i in (0, 1))
print(json.dumps(errors))
"""


def test_cuda_kernels_match_the_reference_under_the_simulator():
    """Every combination in float64, and the max kernels in float32 (RoIWarp (ave) runs on roi_align's)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run([sys.executable, "-c", _SIMULATOR_CHECK], env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 12, errors
    # the gradient's largest entries are ~ 8 * 15 (ramp gradient): float32 keeps them to ~1e-6
    assert max(v for k, v in errors.items() if k.startswith("float64")) < 1e-12, errors
    assert max(v for k, v in errors.items() if k.startswith("float32")) < 2e-5, errors
