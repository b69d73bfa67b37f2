"""The CUDA backends of roi_align and roi_pool run under Numba's CUDA simulator, without a GPU.

The simulator is chosen when numba is first imported, so the kernels run in a subprocess
(``python tests/cuda_simulator_cases.py OUT.pt`` with ``NUMBA_ENABLE_CUDASIM=1``) that only
*records* inputs and outputs; the tests compare them with the NumPy reference themselves.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def record_cases(seed: int = 0) -> dict:
    """Inputs and CUDA-backend outputs (forward, backward of a ones gradient, roi_pool's argmax)
    over random_rois' edge cases, sampling_ratio -1/0/2, aligned or not, spatial_scale 1 and 0.25,
    float32 and float64, contiguous and channels_last maps; plus an all-inf map read only
    outside, no RoIs, and float64 gradcheck results. Plain tensors, bools and numbers."""
    from minimrcnn.ops import roi_align, roi_pool
    from minimrcnn.ops.roi_align import random_rois

    generator = torch.Generator().manual_seed(seed)
    align_cases, pool_cases = [], []
    for dtype in (torch.float32, torch.float64):
        features = torch.randn(2, 2, 5, 6, generator=generator, dtype=dtype)
        for spatial_scale in (1.0, 0.25):
            rois = random_rois(generator, 6, 2, 5, 6, spatial_scale, dtype)
            for sampling_ratio in (-1, 0, 2):
                for aligned in (True, False):
                    leaf = features.clone().requires_grad_()
                    # half the cases read a non-contiguous (channels_last) map
                    source = leaf if aligned else leaf.contiguous(memory_format=torch.channels_last)
                    output = roi_align(source, rois, (2, 3), spatial_scale, sampling_ratio, aligned, backend="cuda")
                    output.backward(torch.ones_like(output))
                    align_cases.append({"features": features, "rois": rois, "spatial_scale": spatial_scale,
                                        "sampling_ratio": sampling_ratio, "aligned": aligned,
                                        "output": output.detach(), "grad": leaf.grad})
            output, argmax = roi_pool(features, rois, (2, 3), spatial_scale, "cuda", True)
            pool_cases.append({"features": features, "rois": rois, "spatial_scale": spatial_scale,
                               "output": output, "argmax": argmax})
    infinite = torch.full((2, 2, 5, 6), float("inf"), dtype=torch.float64)
    outside = torch.tensor([[0, -30, -30, -10, -10], [1, 40, 2, 60, 4]], dtype=torch.float64)
    empty = {}
    for name, op in (("roi_align", roi_align), ("roi_pool", roi_pool)):
        leaf = torch.ones(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
        output = op(leaf, torch.zeros(0, 5, dtype=torch.float64), (2, 3), backend="cuda")
        output.sum().backward()
        empty[name] = {"output": output.detach(), "grad": leaf.grad}
    features = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(generator, 3, 1, 4, 5, 0.5)
    gradcheck = {
        "roi_align": torch.autograd.gradcheck(lambda f: roi_align(f, rois, 2, 0.5, 2, backend="cuda"),
                                              (features,), fast_mode=True, raise_exception=False),
        "roi_pool": torch.autograd.gradcheck(lambda f: roi_pool(f, rois, 2, 0.5, backend="cuda"),
                                             (features,), fast_mode=True, raise_exception=False),
    }
    # RoIPool's bin edges in the input's dtype: a 29-pixel RoI in 7 bins ends at column 29 in float32,
    # at 30 in float64 (a ramp along x makes the last bin's max show it); tests/test_roi_pool.py
    ramp = torch.arange(40.0).repeat(40, 1).reshape(1, 1, 40, 40)
    dtype_edges = []
    for dtype in (torch.float32, torch.float64):
        for corner, spatial_scale in ((28.0, 1.0), (28.0 * 16, 1 / 16)):
            rois = torch.tensor([[0, 0, 0, corner, corner]], dtype=dtype)
            output, argmax = roi_pool(ramp.to(dtype), rois, 7, spatial_scale, "cuda", True)
            dtype_edges.append({"features": ramp.to(dtype), "rois": rois, "spatial_scale": spatial_scale,
                                "output": output, "argmax": argmax})
    return {"roi_align": align_cases, "roi_pool": pool_cases, "empty": empty, "gradcheck": gradcheck,
            "roi_pool_dtype_edges": dtype_edges,
            "outside_on_inf_map": roi_align(infinite, outside, 2, 1.0, 2, backend="cuda")}


@functools.lru_cache(maxsize=None)  # deterministic, and a few seconds per run: once per session
def run_under_simulator(timeout: float = 300) -> dict:
    """record_cases() in a subprocess under NUMBA_ENABLE_CUDASIM=1."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cases.pt"
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        result = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"the CUDA simulator run failed:\n{result.stderr[-3000:]}")
        return torch.load(out)


if __name__ == "__main__":
    from numba import config

    assert config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    torch.save(record_cases(), sys.argv[1])
