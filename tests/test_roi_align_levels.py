"""roi_align_levels: each RoI pooled from its own map, one CUDA launch for all maps (the FPN
pooler's levels). Checked against the float64 NumPy reference map by map, equal to roi_align's
per-map calls exactly, gradcheck; the CUDA backend under the simulator (tests/cuda_simulator_cases.py)."""

import numpy as np
import pytest
import torch

from cuda_simulator_cases import levels_inputs, run_under_simulator
from minimrcnn.modeling.poolers import MultiScaleRoIPooler
from minimrcnn.ops.roi_align import roi_align, roi_align_backward_reference, roi_align_levels, roi_align_reference


def reference_levels(inputs, sampling_ratio, aligned):
    """Map by map with the NumPy reference: output [K, C, 2, 2] and the gradients of a ones grad."""
    maps, rois, roi_levels = inputs["maps"], inputs["rois"].double().numpy(), inputs["roi_levels"].numpy()
    output = np.zeros((len(rois), maps[0].shape[1], 2, 2))
    grads = []
    for level, (level_map, scale) in enumerate(zip(maps, inputs["scales"])):
        rows = roi_levels == level
        output[rows] = roi_align_reference(level_map.double().numpy(), rois[rows], (2, 2), scale, sampling_ratio,
                                           aligned)
        grads.append(roi_align_backward_reference(np.ones((rows.sum(), maps[0].shape[1], 2, 2)), rois[rows],
                                                  tuple(level_map.shape), (2, 2), scale, sampling_ratio, aligned))
    return output, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 2), (False, -1), (True, 0)])
@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_levels_match_the_reference_map_by_map(dtype, aligned, sampling_ratio, backend):
    inputs = levels_inputs(dtype)
    leaves = [m.clone().requires_grad_() for m in inputs["maps"]]
    output = roi_align_levels(leaves, inputs["rois"], inputs["roi_levels"], 2, inputs["scales"], sampling_ratio,
                              aligned, backend=backend)
    output.backward(torch.ones_like(output))
    expected, expected_grads = reference_levels(inputs, sampling_ratio, aligned)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert output.dtype == dtype and output.shape == (9, 2, 2, 2)
    np.testing.assert_allclose(output.detach().double().numpy(), expected, rtol=tolerance, atol=tolerance)
    for leaf, grad in zip(leaves, expected_grads):
        assert leaf.grad.shape == leaf.shape
        np.testing.assert_allclose(leaf.grad.double().numpy(), grad, rtol=tolerance, atol=tolerance)


def test_levels_equal_the_per_map_calls_exactly():
    inputs = levels_inputs(torch.float32)
    leaves = [m.clone().requires_grad_() for m in inputs["maps"]]
    output = roi_align_levels(leaves, inputs["rois"], inputs["roi_levels"], 2, inputs["scales"], 2)
    output.backward(torch.arange(output.numel(), dtype=output.dtype).reshape(output.shape))
    separate = [m.clone().requires_grad_() for m in inputs["maps"]]
    for level, (level_map, scale) in enumerate(zip(separate, inputs["scales"])):
        rows = inputs["roi_levels"] == level
        pooled = roi_align(level_map, inputs["rois"][rows], 2, scale, 2)
        assert torch.equal(output[rows], pooled)
        pooled.backward(torch.arange(output.numel(), dtype=output.dtype).reshape(output.shape)[rows])
    for leaf, per_map in zip(leaves, separate):
        assert torch.equal(leaf.grad, per_map.grad)


def test_levels_gradcheck():
    inputs = levels_inputs(torch.float64)
    leaves = tuple(m.clone().requires_grad_() for m in inputs["maps"])
    assert torch.autograd.gradcheck(
        lambda *maps: roi_align_levels(list(maps), inputs["rois"], inputs["roi_levels"], 2, inputs["scales"], 2),
        leaves)


def test_pooler_one_launch_path_equals_its_per_level_path():
    inputs = levels_inputs(torch.float32)
    pooler = MultiScaleRoIPooler(2, (2, 3, 4, 5, 6), "align", sampling_ratio=2)
    levels = pooler.assign_levels(inputs["pooler_rois"][:, 1:])
    assert len(set(levels.tolist())) == 4  # the RoIs reach every level P2-P5
    leaves = [m.clone().requires_grad_() for m in inputs["pyramid"]]
    at_once = pooler.pool_all_levels(leaves, inputs["pooler_rois"])
    at_once.sum().backward()
    separate = [m.clone().requires_grad_() for m in inputs["pyramid"]]
    per_level = pooler(separate, inputs["pooler_rois"])  # CPU: one call per level
    per_level.sum().backward()
    assert torch.equal(at_once, per_level)
    for leaf, other in zip(leaves[:4], separate[:4]):
        assert torch.equal(leaf.grad, other.grad)
    assert leaves[4].grad is None and separate[4].grad is None  # P6 carries no RoI on either path


def test_levels_bad_inputs_name_the_argument():
    inputs = levels_inputs(torch.float64)
    maps, rois, roi_levels, scales = inputs["maps"], inputs["rois"], inputs["roi_levels"], inputs["scales"]
    with pytest.raises(ValueError, match=r"roi_levels must hold map indices in \[0, 3\)"):
        roi_align_levels(maps, rois, roi_levels + 1, 2, scales)
    wrong_image = rois.clone()
    wrong_image[2, 0] = 1.0  # RoI 2 is on map 2, which holds one image
    with pytest.raises(ValueError, match=r"rois\[2, 0\].*features\[2\]"):
        roi_align_levels(maps, wrong_image, roi_levels, 2, scales)
    with pytest.raises(ValueError, match="spatial_scales: expected 3"):
        roi_align_levels(maps, rois, roi_levels, 2, scales[:2])
    with pytest.raises(ValueError, match=r"features\[1\].*must match"):
        roi_align_levels([maps[0], maps[1][:, :1]], rois[:2], roi_levels[:2] * 0, 2, scales[:2])
    with pytest.raises(ValueError, match=r"roi_levels must be \[K\]"):
        roi_align_levels(maps, rois, roi_levels[:3], 2, scales)
    with pytest.raises(TypeError, match="roi_levels must be an int64"):
        roi_align_levels(maps, rois, roi_levels.int(), 2, scales)
    with pytest.raises(TypeError, match=r"features\[0\] must be one of"):
        roi_align_levels([m.to(torch.bfloat16) for m in maps], rois, roi_levels, 2, scales)  # bf16: CUDA only


@pytest.fixture(scope="module")
def simulated():
    return run_under_simulator()["roi_align_levels"]


def test_cuda_levels_under_the_simulator(simulated):
    for case in simulated["cases"]:
        dtype = case["dtype"]
        inputs = levels_inputs(dtype)
        expected, expected_grads = reference_levels(inputs, case["sampling_ratio"], case["aligned"])
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(case["output"].double().numpy(), expected, rtol=tolerance, atol=tolerance)
        for grad, expected_grad in zip(case["grads"], expected_grads):
            np.testing.assert_allclose(grad.double().numpy(), expected_grad, rtol=tolerance, atol=tolerance)
        assert torch.equal(case["output"], case["per_map"])  # one launch == one launch per map
    assert simulated["gradcheck"]


def test_cuda_pooler_path_under_the_simulator(simulated):
    inputs = levels_inputs(torch.float64)
    pooler = MultiScaleRoIPooler(2, (2, 3, 4, 5, 6), "align", sampling_ratio=2)
    expected = pooler(inputs["pyramid"], inputs["pooler_rois"])  # CPU, per level
    torch.testing.assert_close(simulated["pooled"], expected, rtol=1e-12, atol=1e-12)
    # bf16 maps are read into float32 in the gather: the result is the float32 one of the rounded maps
    rounded = [m.to(torch.bfloat16).float() for m in inputs["pyramid"]]
    expected_bf16 = pooler(rounded, inputs["pooler_rois"].float())
    assert simulated["pooled_bf16"].dtype == torch.float32
    torch.testing.assert_close(simulated["pooled_bf16"], expected_bf16, rtol=1e-5, atol=1e-5)
