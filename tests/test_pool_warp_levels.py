"""roi_pool_levels and roi_warp_levels: each RoI pooled from its own map, one CUDA launch for
all maps (the pooler's path on CUDA for roi_op pool, warp, warp_max and align_max). On CPU they
are one roi_pool / roi_warp call per map; the CUDA kernels run under the simulator (recorded in
tests/cuda_simulator_cases.py) and are checked against the per-level CPU path and one CUDA call
per map."""

import numpy as np
import pytest
import torch

from minimrcnn.modeling.poolers import MultiScaleRoIPooler
from minimrcnn.ops.roi_pool import roi_pool_levels, roi_pool_reference
from minimrcnn.ops.roi_warp import roi_warp_backward_reference, roi_warp_levels, roi_warp_reference

from cuda_simulator_cases import levels_inputs, run_under_simulator

# roi_warp_levels' (sampling_ratio, aligned, quantize, reduction) per roi_op of the pooler
WARP_ARGS = {"warp_max": (2, True, True, "max"), "align_max": (0, False, False, "max"), "warp": (2, True, True, "avg")}


def test_pool_levels_match_the_reference_map_by_map():
    inputs = levels_inputs(torch.float64)
    maps, rois, roi_levels, scales = inputs["maps"], inputs["rois"], inputs["roi_levels"], inputs["scales"]
    output = roi_pool_levels(maps, rois, roi_levels, 2, scales)
    assert output.shape == (9, 2, 2, 2)
    for level, (level_map, scale) in enumerate(zip(maps, scales)):
        rows = roi_levels == level
        expected, _ = roi_pool_reference(level_map.numpy(), rois[rows].numpy(), (2, 2), scale)
        np.testing.assert_array_equal(output[rows].numpy(), expected)


@pytest.mark.parametrize("op", sorted(WARP_ARGS))
def test_warp_levels_match_the_reference_map_by_map_with_gradients(op):
    sampling_ratio, aligned, quantize, reduction = WARP_ARGS[op]
    inputs = levels_inputs(torch.float64)
    maps, rois, roi_levels, scales = inputs["maps"], inputs["rois"], inputs["roi_levels"], inputs["scales"]
    leaves = [m.clone().requires_grad_() for m in maps]
    output = roi_warp_levels(leaves, rois, roi_levels, 2, scales, sampling_ratio, aligned, quantize, reduction)
    grad_output = torch.arange(output.numel(), dtype=torch.float64).reshape(output.shape)
    output.backward(grad_output)
    for level, (level_map, scale) in enumerate(zip(maps, scales)):
        rows = roi_levels == level
        args = ((2, 2), scale, sampling_ratio, aligned, quantize, reduction)
        expected = roi_warp_reference(level_map.numpy(), rois[rows].numpy(), *args)
        expected_grad = roi_warp_backward_reference(level_map.numpy(), grad_output[rows].numpy(), rois[rows].numpy(),
                                                    *args)
        np.testing.assert_allclose(output[rows].detach().numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(leaves[level].grad.numpy(), expected_grad, rtol=0, atol=1e-12)


def test_levels_bad_inputs_name_the_argument():
    inputs = levels_inputs(torch.float64)
    maps, rois, roi_levels, scales = inputs["maps"], inputs["rois"], inputs["roi_levels"], inputs["scales"]
    with pytest.raises(ValueError, match=r"roi_levels must hold map indices in \[0, 3\)"):
        roi_pool_levels(maps, rois, roi_levels + 1, 2, scales)
    with pytest.raises(ValueError, match="spatial_scales: expected 3"):
        roi_warp_levels(maps, rois, roi_levels, 2, scales[:2])
    with pytest.raises(ValueError, match="reduction"):
        roi_warp_levels(maps, rois, roi_levels, 2, scales, reduction="mean")


@pytest.fixture(scope="module")
def simulated():
    return run_under_simulator()["pool_warp_levels"]


@pytest.mark.parametrize("roi_op", ["pool", "warp", "warp_max", "align_max"])
def test_cuda_pooler_path_under_the_simulator(simulated, roi_op):
    """The pooler's one launch for all levels (CUDA kernels) == its per-level path (CPU), with gradients."""
    inputs = levels_inputs(torch.float64)
    pooler = MultiScaleRoIPooler(2, (2, 3, 4, 5, 6), roi_op, sampling_ratio=2)
    assert len(set(pooler.assign_levels(inputs["pooler_rois"][:, 1:]).tolist())) == 4  # every level P2-P5
    leaves = [m.clone().requires_grad_() for m in inputs["pyramid"]]
    expected = pooler(leaves, inputs["pooler_rois"])  # CPU: one call per level
    expected.backward(torch.arange(expected.numel(), dtype=expected.dtype).reshape(expected.shape))
    recorded = simulated["poolers"][roi_op]
    torch.testing.assert_close(recorded["pooled"], expected.detach(), rtol=0, atol=1e-12)
    for grad, leaf in zip(recorded["grads"][:4], leaves[:4]):
        torch.testing.assert_close(grad, leaf.grad, rtol=0, atol=1e-12)
    assert recorded["grads"][4] is None and leaves[4].grad is None  # P6 carries no RoI on either path


@pytest.mark.parametrize("op", ["pool", "warp_max", "align_max"])
def test_cuda_float32_levels_equal_one_launch_per_map_under_the_simulator(simulated, op):
    """The same float32 kernels on the flat maps of three levels as on each map alone: the same numbers."""
    recorded = simulated["float32"][op]
    assert recorded["output"].dtype == torch.float32 and recorded["output"].any()
    assert torch.equal(recorded["output"], recorded["per_map"])
    for grad, per_map_grad in zip(recorded["grads"], recorded["per_map_grads"]):
        torch.testing.assert_close(grad, per_map_grad, rtol=0, atol=1e-6)  # (atomics add in any order)
