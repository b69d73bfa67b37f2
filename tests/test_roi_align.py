"""RoIAlign: every backend against the float64 NumPy reference, known values,
gradients, edge cases and bad inputs. The CUDA kernels run under the simulator
in a subprocess (NUMBA_ENABLE_CUDASIM is read when numba is imported)."""

import importlib

import numba
import numpy as np
import pytest
import torch

from minimrcnn.ops import RoIAlign, roi_align
from minimrcnn.ops.roi_align import random_rois, roi_align_reference

from cuda_simulator_cases import run_under_simulator

roi_align_module = importlib.import_module("minimrcnn.ops.roi_align")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
CPU_BACKENDS = ("reference", "numba")


def small_case(dtype, spatial_scale=1.0, seed=0, num_rois=12):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 9, 11, generator=generator, dtype=dtype)
    rois = random_rois(generator, num_rois, 2, 9, 11, spatial_scale, dtype)
    return features, rois


def forward_and_grad(features, rois, backend, *args, grad_output="ramp"):
    leaf = features.detach().clone().requires_grad_()
    output = roi_align(leaf, rois, *args, backend=backend)
    grad_output = torch.ones_like(output) if grad_output == "ones" else \
        torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    output.backward(grad_output)
    return output.detach(), leaf.grad


# --- known values ------------------------------------------------------------

DETECTRON2_EXPECTED = {
    False: [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
    True: [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
def test_detectron2_forward_output(backend, aligned):
    features = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5)
    rois = torch.tensor([[0, 1, 1, 3, 3]], dtype=torch.float32)
    output = roi_align(features, rois, 4, 1.0, 0, aligned, backend=backend)
    assert torch.equal(output[0, 0], torch.tensor(DETECTRON2_EXPECTED[aligned]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_detectron2_empty_box(backend):
    features = torch.randn(1, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 3, 4, 5, 4]], dtype=torch.float64)  # zero height
    output = roi_align(features, rois, 7, 1.0, 0, True, backend=backend)
    output.sum().backward()
    assert torch.equal(output, torch.zeros_like(output))
    assert torch.equal(features.grad, torch.zeros_like(features))
    unaligned = roi_align(features, rois, 7, 1.0, 0, False, backend=backend)  # height clamped to 1
    assert unaligned.abs().sum() > 0


def test_hand_computed_single_sample():
    features = torch.tensor([[[[0.0, 10.0, 20.0], [30.0, 40.0, 50.0]]]])
    rois = torch.tensor([[0.0, 1.0, 0.0, 1.5, 1.0]])
    for backend in CPU_BACKENDS:
        # not aligned: width 0.5 clamped to 1, one sample at (y, x) = (0.5, 1.5): mean of 10, 20, 40, 50
        unaligned = roi_align(features, rois, 1, 1.0, 1, aligned=False, backend=backend)
        assert unaligned.item() == pytest.approx(30.0)
        # aligned: start (-0.5, 0.5), size (1, 0.5), sample at (0.0, 0.75): 0.25 * 0 + 0.75 * 10
        aligned = roi_align(features, rois, 1, 1.0, 1, aligned=True, backend=backend)
        assert aligned.item() == pytest.approx(7.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_spike_with_several_samples_per_bin(backend):
    """A map that is 0 except a 1 at (y, x) = (2, 2): bilinear sampling there is the tent
    t(y) t(x) with t(u) = max(0, 1 - |u - 2|), so every sample point shows (on a linear ramp
    averaging hides a wrong grid). Aligned, scale 1: the box [1, 1, 4, 4] starts at 0.5, size 3."""
    features = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    features[0, 0, 2, 2] = 1.0
    box = torch.tensor([[0.0, 1, 1, 4, 4]], dtype=torch.float64)
    # 2 x 2 bins of 1.5, sampling_ratio 2: samples at 0.875, 1.625 | 2.375, 3.125 along each axis.
    # Along y (spike row 2) the tents are 0, 0.625 | 0.625, 0: bin means 0.3125, 0.3125. Moved to
    # column 3, along x they are 0, 0 | 0.375, 0.875: bin means 0 and 0.625. A cell is the product.
    shifted = torch.roll(features, 1, dims=3)  # the 1 at (2, 3)
    two_by_two = roi_align(shifted, box, 2, 1.0, 2, True, backend=backend)
    expected = torch.tensor([[0.0, 0.3125 * 0.625], [0.0, 0.3125 * 0.625]], dtype=torch.float64)
    torch.testing.assert_close(two_by_two[0, 0], expected, rtol=0, atol=1e-12)
    # One bin of 3: sampling_ratio 2 samples 1.25, 2.75 (tents 0.25, 0.25): 0.25 ** 2 ...
    assert roi_align(features, box, 1, 1.0, 2, True, backend=backend).item() == pytest.approx(0.0625, abs=1e-12)
    # ... the adaptive setting takes ceil(3 / 1) = 3 samples: 1, 2, 3 (tents 0, 1, 0): (1 / 3) ** 2.
    assert roi_align(features, box, 1, 1.0, 0, True, backend=backend).item() == pytest.approx(1 / 9, abs=1e-12)
    # Adaptive grids are set per axis: a box 3 wide and 2 high takes 3 x-samples, 2 y-samples
    # (y at 1, 2: tents 0, 1): (1 / 2) * (1 / 3).
    wide = torch.tensor([[0.0, 1, 1, 4, 3]], dtype=torch.float64)
    assert roi_align(features, wide, 1, 1.0, 0, True, backend=backend).item() == pytest.approx(1 / 6, abs=1e-12)


# --- every backend against the reference --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_numba_matches_reference(dtype, spatial_scale, sampling_ratio, aligned):
    features, rois = small_case(dtype, spatial_scale, seed=sampling_ratio + 7)
    args = ((3, 2), spatial_scale, sampling_ratio, aligned)  # non-square output
    expected = roi_align_reference(features.double().numpy(), rois.double().numpy(), *args)
    output, grad = forward_and_grad(features, rois, "numba", *args)
    ref_output, ref_grad = forward_and_grad(features.double(), rois.double(), "reference", *args)
    assert output.dtype == dtype
    np.testing.assert_allclose(output.double().numpy(), expected, rtol=0, atol=TOLERANCE[dtype])
    np.testing.assert_allclose(grad.double().numpy(), ref_grad.numpy(), rtol=0, atol=TOLERANCE[dtype])


def test_auto_uses_numba_on_cpu():
    features, rois = small_case(torch.float32)
    assert torch.equal(roi_align(features, rois, 2), roi_align(features, rois, 2, backend="numba"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    features, rois = small_case(torch.float64, 0.5)
    expected = roi_align(features, rois, (2, 3), 0.5, 2, backend=backend)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    transposed = features.transpose(2, 3).contiguous().transpose(2, 3)
    strided_rois = torch.stack([rois, rois], dim=2)[:, :, 0]  # same values, stride 2
    assert torch.equal(strided_rois, rois) and not strided_rois.is_contiguous()
    for variant in (channels_last, transposed):
        assert not variant.is_contiguous()
        output = roi_align(variant, strided_rois, (2, 3), 0.5, 2, backend=backend)
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


def test_numba_backward_is_deterministic_across_thread_counts():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has only one thread here (NUMBA_NUM_THREADS=1): nothing to compare")
    features, rois = small_case(torch.float32, 0.5, num_rois=40)
    threads = numba.get_num_threads()
    grads = []
    try:
        for count in (1, 2):  # 2 threads split the work, whatever the default thread count is
            numba.set_num_threads(count)
            grads.append(forward_and_grad(features, rois, "numba", 3, 0.5, 2, True)[1])
    finally:
        numba.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_many_channels_and_channels_last_gradient():
    # more than one channel block in both kernels
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 300, 6, 7, generator=generator, dtype=torch.float64)
    rois = random_rois(generator, 5, 2, 6, 7, 0.5)
    output, grad = forward_and_grad(features, rois, "numba", 2, 0.5, -1, True)
    ref_output, ref_grad = forward_and_grad(features, rois, "reference", 2, 0.5, -1, True)
    torch.testing.assert_close(output, ref_output, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck(backend, aligned):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(generator, 6, 2, 5, 6, 0.5)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 0.5, -1, aligned, backend), (features,))


def test_cuda_backend_under_simulator():
    """The CUDA kernels' outputs and gradients (recorded under the simulator) against the
    reference, forward and backward, computed here."""
    recorded = run_under_simulator()
    assert len(recorded["roi_align"]) == 24
    for case in recorded["roi_align"]:
        args = ((2, 3), case["spatial_scale"], case["sampling_ratio"], case["aligned"])
        expected, expected_grad = forward_and_grad(case["features"], case["rois"], "reference", *args,
                                                   grad_output="ones")
        tolerance = TOLERANCE[case["features"].dtype]
        torch.testing.assert_close(case["output"], expected, rtol=0, atol=tolerance)
        torch.testing.assert_close(case["grad"], expected_grad, rtol=0, atol=tolerance)
    assert recorded["gradcheck"]["roi_align"] is True
    # samples outside the map are not read: an all-inf map gives 0 there, not NaN
    assert torch.equal(recorded["outside_on_inf_map"], torch.zeros(2, 2, 2, 2, dtype=torch.float64))
    empty = recorded["empty"]["roi_align"]
    assert empty["output"].shape == (0, 2, 2, 3) and not empty["grad"].any()


def test_cuda_backend_on_cpu_tensors_needs_the_simulator():
    features, rois = small_case(torch.float32)
    with pytest.raises(ValueError, match="NUMBA_ENABLE_CUDASIM"):
        roi_align(features, rois, 2, backend="cuda")


# --- empty and degenerate inputs ----------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_rois(backend):
    features = torch.randn(2, 3, 5, 5, requires_grad=True)
    output = roi_align(features, torch.zeros(0, 5), (2, 4), backend=backend)
    assert output.shape == (0, 3, 2, 4)
    output.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_rois_wholly_outside_give_zero():
    features = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0, 20, 20, 30, 30], [0, -30, -30, -10, -10]], dtype=torch.float32)
    for backend in CPU_BACKENDS:
        assert torch.equal(roi_align(features, rois, 3, backend=backend), torch.zeros(2, 2, 3, 3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_samples_outside_the_map_do_not_read_it(backend):
    # an outside sample contributes nothing, not 0 * value: inf/NaN features stay out of the result
    features = torch.full((1, 1, 5, 5), float("nan"), dtype=torch.float64)
    features[0, 0, 1:, 1:] = 1.0  # only the first row and column are NaN
    rois = torch.tensor([[0, -30, -30, -10, -10], [0, 1.5, 1.5, 4, 4]], dtype=torch.float64)
    output = roi_align(features, rois, 2, 1.0, 2, backend=backend)
    assert torch.equal(output[0], torch.zeros(1, 2, 2))
    assert torch.equal(output[1], torch.ones(1, 2, 2))


def test_module_wrapper():
    features, rois = small_case(torch.float32, 0.25)
    module = RoIAlign((2, 3), spatial_scale=0.25, sampling_ratio=2)
    assert torch.equal(module(features, rois), roi_align(features, rois, (2, 3), 0.25, 2))
    assert "output_size=(2, 3)" in repr(module)


# --- bad inputs -----------------------------------------------------------------


def _bad_calls():
    features = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1, 1, 5, 5], [1, 0, 0, 4, 4]], dtype=torch.float32)
    nan_rois, inf_rois, index_rois, fractional_rois = rois.clone(), rois.clone(), rois.clone(), rois.clone()
    nan_rois[0, 2] = float("nan")
    inf_rois[1, 3] = float("inf")
    index_rois[1, 0] = 2
    fractional_rois[1, 0] = 0.5
    return [
        ((features[0], rois), {}, ValueError, "features"),
        ((features.int(), rois), {}, TypeError, "features"),
        ((features.numpy(), rois), {}, TypeError, "features"),
        ((features, rois[:, :4]), {}, ValueError, "rois"),
        ((features, rois[0]), {}, ValueError, "rois"),
        ((features, rois.double()), {}, TypeError, "rois dtype"),
        ((features, nan_rois), {}, ValueError, "finite"),
        ((features, inf_rois), {}, ValueError, "finite"),
        ((features, index_rois), {}, ValueError, "batch index"),
        ((features, -rois.abs() - 1), {}, ValueError, "batch index"),
        ((features, fractional_rois), {}, ValueError, "batch index"),
        ((features, rois), {"output_size": 0}, ValueError, "output_size"),
        ((features, rois), {"output_size": (2, 2, 2)}, TypeError, "output_size"),
        ((features, rois), {"output_size": 2.5}, TypeError, "output_size"),
        ((features, rois), {"spatial_scale": 0.0}, ValueError, "spatial_scale"),
        ((features, rois), {"spatial_scale": float("nan")}, ValueError, "spatial_scale"),
        ((features, rois), {"sampling_ratio": 1.5}, TypeError, "sampling_ratio"),
        ((features, rois), {"backend": "fast"}, ValueError, "backend"),
    ]


@pytest.mark.parametrize("args,kwargs,error,message", _bad_calls())
def test_bad_inputs(args, kwargs, error, message):
    kwargs = {"output_size": 2, **kwargs}
    with pytest.raises(error, match=message):
        roi_align(*args, **kwargs)


def test_device_mismatch_is_reported():
    features = torch.randn(1, 1, 4, 4, device="meta")
    with pytest.raises(ValueError, match="rois are on cpu"):
        roi_align(features, torch.zeros(1, 5, dtype=torch.float32), 2)


def test_shared_helper_is_the_bilinear_rule():
    # the scalar helper compiled for CPU and CUDA: clamp below 0, snap at the last pixel, 0 outside
    interp = roi_align_module.linear_interpolation_1d
    assert interp(-1.5, 5) == (0, 0, 0.0, 0.0)
    assert interp(-0.5, 5) == (0, 1, 1.0, 0.0)
    assert interp(2.25, 5) == (2, 3, 0.75, 0.25)
    assert interp(4.5, 5) == (4, 4, 1.0, 0.0)
    assert interp(float("nan"), 5) == (0, 0, 0.0, 0.0)
    assert roi_align_module._interp_cpu(2.25, 5) == (2, 3, 0.75, 0.25)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "roi_warp"])
def test_cuda_kernels_compile_for_a_real_gpu(monkeypatch, op):
    # The simulator runs the kernels as Python, so it cannot catch what the real CUDA target
    # rejects (it rejected max(a, b) in device code once). Compiling to PTX needs only NVVM
    # from a CUDA toolkit, no GPU: run where one is installed (e.g. CUDA_HOME set).
    from numba import cuda
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():  # only a missing libNVVM skips; a broken one fails below
        pytest.skip("no NVVM (libNVVM of a CUDA toolkit) here")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _FakeDevice())  # device functions ask for it
    # the op's kernels (RoIWarp's: the max reduction), with the very signatures they are
    # launched with (LazyKernel)
    module = importlib.import_module(f"minimrcnn.ops.{op}")
    assert set(module.CUDA_KERNELS) == {torch.float32, torch.float64}
    for dtype, kernels in module.CUDA_KERNELS.items():
        for kernel in kernels:
            ptx, _ = cuda.compile_ptx(kernel.py_func, kernel.signature, cc=(9, 0))
            assert ".entry" in ptx
            if dtype == torch.float32:
                # float32 all through: no float64 register, load, conversion or arithmetic
                # (a Python-float accumulator such as `total = 0.0` would bring them back)
                assert ".f64" not in ptx, kernel


class _FakeDevice:
    compute_capability = (9, 0)
