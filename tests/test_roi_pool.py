"""RoIPool: hand-computed cases (C rounding, ties, empty bins), every backend
against the NumPy reference, gradients, edge cases and bad inputs."""

import numpy as np
import pytest
import torch

from minimrcnn.ops import RoIPool, roi_pool
from minimrcnn.ops.roi_align import random_rois
from minimrcnn.ops.roi_pool import round_half_away, roi_pool_reference

from cuda_simulator_cases import run_under_simulator

CPU_BACKENDS = ("reference", "numba")


def ramp(height=8, width=8):
    return torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_bins(backend):
    # corners (1, 1)-(4, 4) inclusive: size 4, two bins of 2 pixels per axis; on a ramp
    # each bin's max is its bottom-right pixel
    rois = torch.tensor([[0, 1, 1, 4, 4]], dtype=torch.float32)
    output, argmax = roi_pool(ramp(), rois, 2, backend=backend, return_argmax=True)
    assert output[0, 0].tolist() == [[18, 20], [34, 36]]
    assert argmax[0, 0].tolist() == [[18, 20], [34, 36]]


def test_round_half_away_from_zero():
    assert [round_half_away(v) for v in (2.5, -2.5, 0.5, -0.5, 1.49, -1.51)] == [3, -3, 1, -1, 1, -2]
    assert round(2.5) == 2  # Python's rounding differs at halves: the reason for round_half_away


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_corners_round_halves_away_from_zero(backend):
    # x1 = x2 = 2.5 -> column 3 (banker's rounding would give column 2)
    single = roi_pool(ramp(), torch.tensor([[0, 2.5, 0, 2.5, 0]]), 1, backend=backend)
    assert single.item() == 3
    # x1 = -2.5 -> -3 and x2 = 0.5 -> 1: columns [-3, 1] clipped to [0, 1] -> max is column 1
    negative = roi_pool(ramp(), torch.tensor([[0, -2.5, 0, 0.5, 0]]), 1, backend=backend)
    assert negative.item() == 1
    # spatial_scale applies before rounding: 10 * 0.25 = 2.5 -> 3
    scaled = roi_pool(ramp(), torch.tensor([[0, 10.0, 0, 10.0, 0]]), 1, 0.25, backend=backend)
    assert scaled.item() == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_the_first_pixel_in_row_major_order(backend):
    features = torch.zeros(1, 2, 8, 8)
    rois = torch.tensor([[0, 1, 1, 4, 4]], dtype=torch.float32)
    output, argmax = roi_pool(features, rois, 2, backend=backend, return_argmax=True)
    assert torch.equal(output, torch.zeros(1, 2, 2, 2))
    assert argmax[0, 1].tolist() == [[9, 11], [25, 27]]  # top-left pixel of each bin


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_bins_give_zero_and_no_gradient(backend):
    features = (ramp() - 100).requires_grad_()  # all negative: an empty bin's 0 is not a max
    rois = torch.tensor([[0, 6, 6, 10, 10], [0, 20, 20, 30, 30]], dtype=torch.float32)
    output, argmax = roi_pool(features, rois, 2, backend=backend, return_argmax=True)
    # first RoI: size 5, bins [6, 9) and [8, 11) per axis, clipped to the 8x8 map: only bin (0, 0) is non-empty
    assert output[0, 0].tolist() == [[63 - 100, 0], [0, 0]]
    assert argmax[0, 0].tolist() == [[63, -1], [-1, -1]]
    assert torch.equal(output[1], torch.zeros(1, 2, 2)) and (argmax[1] == -1).all()
    output.sum().backward()
    expected_grad = torch.zeros(64)
    expected_grad[63] = 1
    assert torch.equal(features.grad.flatten(), expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
def test_numba_matches_reference(dtype, spatial_scale):
    generator = torch.Generator().manual_seed(int(spatial_scale * 8))
    features = torch.randn(2, 3, 9, 11, generator=generator, dtype=dtype, requires_grad=True)
    rois = random_rois(generator, 18, 2, 9, 11, spatial_scale, dtype)
    expected, expected_argmax = roi_pool_reference(features.detach().double().numpy(), rois.numpy(), (3, 2),
                                                   spatial_scale)
    output, argmax = roi_pool(features, rois, (3, 2), spatial_scale, "numba", return_argmax=True)
    np.testing.assert_array_equal(output.detach().double().numpy(), expected)  # a max is exact
    np.testing.assert_array_equal(argmax.numpy(), expected_argmax)
    grad_output = torch.randn(output.shape, generator=generator, dtype=dtype)
    (grad,) = torch.autograd.grad(output, features, grad_output)
    leaf = features.detach().clone().requires_grad_()
    roi_pool(leaf, rois, (3, 2), spatial_scale, "reference").backward(grad_output)
    torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_auto_uses_numba_on_cpu():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 9, 11, generator=generator)
    rois = random_rois(generator, 6, 2, 9, 11, dtype=torch.float32)
    assert torch.equal(roi_pool(features, rois, 2), roi_pool(features, rois, 2, backend="numba"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 9, 11, generator=generator)
    rois = random_rois(generator, 8, 2, 9, 11, 0.5, torch.float32)
    expected = roi_pool(features, rois, (2, 3), 0.5, backend)
    for variant in (features.contiguous(memory_format=torch.channels_last),
                    features.transpose(2, 3).contiguous().transpose(2, 3)):
        assert torch.equal(roi_pool(variant, torch.stack([rois, rois], 2)[:, :, 0], (2, 3), 0.5, backend), expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck(backend):
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(2, 2, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(generator, 6, 2, 6, 7, 0.5)
    assert torch.autograd.gradcheck(lambda f: roi_pool(f, rois, (2, 3), 0.5, backend), (features,))


def test_cuda_backend_under_simulator():
    """The CUDA kernel's maxima and argmax (recorded under the simulator) against the reference."""
    recorded = run_under_simulator()
    assert len(recorded["roi_pool"]) == 4
    for case in recorded["roi_pool"]:
        expected, expected_argmax = roi_pool(case["features"], case["rois"], (2, 3), case["spatial_scale"],
                                             "reference", True)
        assert torch.equal(case["output"], expected)
        assert torch.equal(case["argmax"], expected_argmax)
    assert recorded["gradcheck"]["roi_pool"] is True
    empty = recorded["empty"]["roi_pool"]
    assert empty["output"].shape == (0, 2, 2, 3) and not empty["grad"].any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_rois(backend):
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    output = roi_pool(features, torch.zeros(0, 5), (2, 4), backend=backend)
    assert output.shape == (0, 3, 2, 4)
    output.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_module_wrapper():
    features = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1, 1, 6, 6]], dtype=torch.float32)
    module = RoIPool(3, spatial_scale=0.5)
    assert torch.equal(module(features, rois), roi_pool(features, rois, 3, 0.5))
    assert "output_size=(3, 3)" in repr(module)


@pytest.mark.parametrize(
    "features,rois,message",
    [
        (torch.randn(1, 1, 4, 4).long(), torch.zeros(1, 5), "features"),
        (torch.randn(1, 4, 4), torch.zeros(1, 5), "features"),
        (torch.randn(1, 1, 4, 4), torch.zeros(1, 4), "rois"),
        (torch.randn(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 2, 2]]), "batch index"),
        (torch.randn(1, 1, 4, 4), torch.tensor([[0.0, 0, float("nan"), 2, 2]]), "finite"),
        (torch.randn(1, 1, 4, 4), torch.zeros(1, 5, dtype=torch.float64), "dtype"),
    ],
)
def test_bad_inputs(features, rois, message):
    with pytest.raises((TypeError, ValueError), match=message):
        roi_pool(features, rois, 2)
