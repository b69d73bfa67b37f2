"""RoIPool: hand-computed cases (C rounding, ties, empty bins), every backend
against the NumPy reference, gradients, edge cases and bad inputs."""

import numpy as np
import pytest
import torch

from minimrcnn.ops import RoIPool, roi_pool
from minimrcnn.ops.roi_align import random_rois
from minimrcnn.ops.roi_pool import round_half_away, roi_pool_bins, roi_pool_reference

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


# --- float32 parity with torchvision: bin edges in the input's dtype -------------------------


def torchvision_roi_pool_float32(features, rois, pooled, spatial_scale):
    """A line-by-line NumPy float32 transcription of torchvision's RoIPool forward kernel
    (roi_pool_kernel.cpp, template type T = float): every product and quotient in float32."""
    f32 = np.float32
    features, rois, scale = np.asarray(features, f32), np.asarray(rois, f32), f32(spatial_scale)
    _, channels, height, width = features.shape

    def c_round(value):  # std::round(float): halves away from zero; float64 +-0.5 is exact for a float32
        return int(np.trunc(np.float64(value) + np.copysign(0.5, value)))

    output = np.zeros((len(rois), channels, pooled, pooled), f32)
    argmax = np.full(output.shape, -1, np.int64)
    for k, roi in enumerate(rois):
        start_w, start_h = c_round(roi[1] * scale), c_round(roi[2] * scale)
        end_w, end_h = c_round(roi[3] * scale), c_round(roi[4] * scale)
        bin_size_h = f32(max(end_h - start_h + 1, 1)) / f32(pooled)
        bin_size_w = f32(max(end_w - start_w + 1, 1)) / f32(pooled)
        for ph in range(pooled):
            hstart = min(max(int(np.floor(f32(ph) * bin_size_h)) + start_h, 0), height)
            hend = min(max(int(np.ceil(f32(ph + 1) * bin_size_h)) + start_h, 0), height)
            for pw in range(pooled):
                wstart = min(max(int(np.floor(f32(pw) * bin_size_w)) + start_w, 0), width)
                wend = min(max(int(np.ceil(f32(pw + 1) * bin_size_w)) + start_w, 0), width)
                if hend <= hstart or wend <= wstart:
                    continue
                window = features[int(roi[0]), :, hstart:hend, wstart:wend].reshape(channels, -1)
                first = window.argmax(axis=1)  # the first maximum in row-major order, like the strict '>'
                output[k, :, ph, pw] = window[np.arange(channels), first]
                rows, cols = np.divmod(first, wend - wstart)
                argmax[k, :, ph, pw] = (hstart + rows) * width + wstart + cols
    return output, argmax


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4, 1 / 16, 1 / 32])
def test_float32_matches_torchvision_float32_arithmetic(backend, spatial_scale):
    # maps of 40 x 44 and RoIs up to ~3x the map: RoI sizes of 1..130 pixels, among them the
    # sizes whose float32 bin edges differ from float64 ones (29, 31, 57, ... for 7/14/28 bins)
    generator = torch.Generator().manual_seed(int(1 / spatial_scale))
    features = torch.randn(2, 2, 40, 44, generator=generator)
    rois = random_rois(generator, 24, 2, 40, 44, spatial_scale, torch.float32)
    for pooled in (7, 14, 28):
        expected, expected_argmax = torchvision_roi_pool_float32(features.numpy(), rois.numpy(), pooled, spatial_scale)
        output, argmax = roi_pool(features, rois, pooled, spatial_scale, backend, return_argmax=True)
        np.testing.assert_array_equal(output.numpy(), expected)
        np.testing.assert_array_equal(argmax.numpy(), expected_argmax)


FLOAT32_EDGE_CASES = [  # (RoI x1 = y1 = 0 to x2 = y2, spatial_scale, bins): 29 pixels on the map, 7 bins
    (28.0, 1.0, 7),  # last bin's end: ceil(7 * f32(29 / 7)) = 29, but ceil(7 * (29 / 7)) = 30 in float64
    (28.0 * 16, 1 / 16, 7),
    (28.0 * 16, 1 / 16, 28),  # the 28-bin head: ceil(28 * (29 / 28)) = 30 in float64, 29 in float32
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("corner,spatial_scale,pooled", FLOAT32_EDGE_CASES)
def test_bin_edges_in_the_inputs_dtype(backend, corner, spatial_scale, pooled):
    # a ramp along x: the last column bin's max is its last column, which tells the bin's end
    features = torch.arange(40.0).repeat(40, 1).reshape(1, 1, 40, 40)
    rois = torch.tensor([[0, 0, 0, corner, corner]])
    last = roi_pool(features, rois, pooled, spatial_scale, backend)[0, 0, 0, -1].item()
    assert last == 28  # float32: columns [.., 29)
    assert last == torchvision_roi_pool_float32(features.numpy(), rois.numpy(), pooled, spatial_scale)[0][0, 0, 0, -1]
    wide = roi_pool(features.double(), rois.double(), pooled, spatial_scale, backend)[0, 0, 0, -1].item()
    assert wide == 29  # float64 arithmetic (torchvision's for float64 inputs): columns [.., 30)


def test_roi_pool_bins_takes_the_arithmetic_dtype():
    roi = [0, 0, 0, 28.0, 28.0]
    assert list(roi_pool_bins(roi, 40, 40, (7, 7)))[-1][2:] == (24, 30, 24, 30)  # float64 by default
    assert list(roi_pool_bins(roi, 40, 40, (7, 7), dtype=np.float32))[-1][2:] == (24, 29, 24, 29)


def test_round_half_away_is_exact_below_a_half():
    below_half = np.nextafter(np.float32(0.5), np.float32(0))  # 0.49999997: floor(v + 0.5) in float32 gives 1
    assert round_half_away(below_half) == 0 and round_half_away(-below_half) == 0
    assert round_half_away(np.nextafter(0.5, 0)) == 0  # and in float64


def test_cuda_bin_edges_in_the_inputs_dtype_under_simulator():
    cases = run_under_simulator()["roi_pool_dtype_edges"]
    assert [case["output"][0, 0, 0, -1].item() for case in cases] == [28, 28, 29, 29]  # float32, float32, float64...
    for case in cases:
        expected, expected_argmax = roi_pool(case["features"], case["rois"], 7, case["spatial_scale"], "reference",
                                             True)
        assert torch.equal(case["output"], expected) and torch.equal(case["argmax"], expected_argmax)
