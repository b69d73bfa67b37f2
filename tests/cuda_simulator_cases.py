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
            "roi_pool_dtype_edges": dtype_edges, "nms": record_nms_cases(),
            "outside_on_inf_map": roi_align(infinite, outside, 2, 1.0, 2, backend="cuda")}


def nms_cases() -> list[dict]:
    """Inputs of the device NMS cases (tests/test_nms_cuda.py): ties, exactly-threshold IoU,
    duplicates across the 64-box block boundary, degenerate boxes, classes, empty; <= 130 boxes."""
    import numpy as np

    rng = np.random.default_rng(0)

    def coarse(num, seed):  # coordinates on a 10-pixel grid: ties and duplicates are likely
        corner = np.random.default_rng(seed).uniform(0, 100, (num, 2))
        size = np.random.default_rng(seed + 1).uniform(1, 50, (num, 2))
        return torch.tensor(np.round(np.concatenate([corner, corner + size], 1) / 10) * 10 + [0, 0, 5, 5],
                            dtype=torch.float32)

    cases = [
        {"boxes": coarse(60, 1), "scores": torch.tensor(rng.integers(0, 5, 60), dtype=torch.float32),
         "classes": torch.zeros(60, dtype=torch.int64), "threshold": 0.5},  # tied scores
        {"boxes": coarse(130, 2), "scores": torch.tensor(rng.random(130), dtype=torch.float32),
         "classes": torch.tensor(rng.integers(0, 3, 130)), "threshold": 0.3},  # 3 blocks, classes
        {"boxes": coarse(130, 3).double(), "scores": torch.tensor(rng.integers(0, 3, 130), dtype=torch.float64),
         "classes": torch.tensor(rng.integers(0, 2, 130)), "threshold": 0.7},  # float64, ties
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]).repeat(65, 1), "scores": torch.ones(65),
         "classes": torch.tensor([0] * 64 + [1]), "threshold": 0.5},  # the 65th, in block 1, is another class
        {"boxes": torch.tensor([[0.0, 0, 2, 1], [1.0, 0, 3, 1]]), "scores": torch.tensor([1.0, 0.5]),
         "classes": torch.zeros(2, dtype=torch.int64), "threshold": 1 / 3},  # IoU exactly 1/3: kept
        {"boxes": torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [0, 0, 4, 4]]), "scores": torch.tensor([1.0, .5, .2]),
         "classes": torch.zeros(3, dtype=torch.int64), "threshold": 0.5},  # degenerate: 0 / 0 never suppresses
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "classes": torch.zeros(0, dtype=torch.int64),
         "threshold": 0.5},
    ]
    for case in cases:
        case["max_kept"] = len(case["scores"])
    cases.append(dict(cases[1], max_kept=7))  # stops after 7 kept
    return cases


def record_nms_cases() -> dict:
    """Device-NMS results under the simulator: batched_nms_bitmask per case, and sorted_rows_nms on
    three padded rows at once (10, 0 and 70 boxes taking part)."""
    from minimrcnn.ops.nms_cuda import batched_nms_bitmask, sorted_rows_nms

    cases = nms_cases()
    kept = [batched_nms_bitmask(c["boxes"], c["scores"], c["classes"], c["threshold"], c["max_kept"])
            for c in cases]
    # the same cases split into one row per class (what more than SINGLE_ROW_MAX boxes take)
    kept_by_class = [batched_nms_bitmask(c["boxes"], c["scores"], c["classes"], c["threshold"], c["max_kept"],
                                         single_row_max=0) for c in cases]
    generator = torch.Generator().manual_seed(5)
    boxes = torch.rand(3, 70, 2, generator=generator) * 60
    boxes = torch.cat([boxes, boxes + 5 + torch.rand(3, 70, 2, generator=generator) * 30], 2)
    classes = torch.randint(0, 2, (3, 70), generator=generator)
    counts = torch.tensor([10, 0, 70])
    rows = sorted_rows_nms(boxes, classes, counts, 0.4, 50)
    rows = {"boxes": boxes, "classes": classes, "counts": counts, "threshold": 0.4, "max_kept": 50,
            "kept": torch.from_numpy(rows[0]), "num_kept": torch.from_numpy(rows[1])}
    return {"cases": cases, "kept": kept, "kept_by_class": kept_by_class, "rows": rows}


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
