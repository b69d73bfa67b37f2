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
            "roi_pool_dtype_edges": dtype_edges, "nms": record_nms_cases(), "roi_align_levels": record_levels_cases(),
            "pool_warp_levels": record_pool_warp_levels_cases(),
            "outside_on_inf_map": roi_align(infinite, outside, 2, 1.0, 2, backend="cuda")}


def levels_inputs(dtype=torch.float64, seed: int = 3) -> dict:
    """Tiny inputs of roi_align_levels: three maps of different sizes and image counts (the
    pooler's FPN levels, or a batch's mask images), RoIs spread over them, and a pooler's
    pyramid ([2, 2, 16, 16] at stride 4 down to [2, 2, 2, 2] at stride 32, plus a stride-64 map)."""
    from minimrcnn.ops.roi_align import random_rois

    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 2, 6, 7, generator=generator, dtype=dtype),
            torch.randn(3, 2, 3, 4, generator=generator, dtype=dtype),
            torch.randn(1, 2, 2, 2, generator=generator, dtype=dtype)]
    scales = (1.0, 0.5, 0.25)
    rois = random_rois(generator, 9, 1, 6, 7, 1.0, dtype)  # batch index 0: valid on every map
    roi_levels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0])
    rois[roi_levels == 1, 0] = torch.tensor([2.0, 1.0, 0.0, 2.0], dtype=dtype)  # this map holds 3 images
    pyramid = [torch.randn(2, 2, 64 // 2**level, 64 // 2**level, generator=generator, dtype=dtype)
               for level in (2, 3, 4, 5, 6)]
    corner = torch.rand(8, 2, generator=generator, dtype=torch.float64) * 40
    size = torch.tensor([8.0, 20, 60, 80, 150, 200, 300, 500], dtype=torch.float64)[:, None]
    boxes = torch.cat([corner, corner + size], dim=1)
    pooler_rois = torch.cat([torch.tensor([0.0, 1, 0, 1, 1, 0, 1, 0])[:, None], boxes], dim=1).to(dtype)
    return {"maps": maps, "scales": scales, "rois": rois, "roi_levels": roi_levels,
            "pyramid": pyramid, "pooler_rois": pooler_rois}


def record_levels_cases() -> dict:
    """roi_align_levels on the CUDA backend (one launch for all maps) beside roi_align's per-map
    CUDA calls; float32 and float64, aligned or not; a bf16 pyramid; a pooler's one-launch path;
    and a float64 gradcheck over all three maps."""
    from minimrcnn.modeling.poolers import MultiScaleRoIPooler
    from minimrcnn.ops.roi_align import roi_align, roi_align_levels

    cases = []
    # (two cases, not four: the simulator pays ~0.3 ms a thread)
    for dtype, aligned, sampling_ratio in ((torch.float32, True, 2), (torch.float64, False, -1)):
        inputs = levels_inputs(dtype)
        leaves = [m.clone().requires_grad_() for m in inputs["maps"]]
        output = roi_align_levels(leaves, inputs["rois"], inputs["roi_levels"], 2, inputs["scales"],
                                  sampling_ratio, aligned, backend="cuda")
        output.backward(torch.ones_like(output))
        per_map = torch.zeros_like(output)
        for level, (level_map, scale) in enumerate(zip(inputs["maps"], inputs["scales"])):
            rows = inputs["roi_levels"] == level
            per_map[rows] = roi_align(level_map, inputs["rois"][rows], 2, scale, sampling_ratio, aligned,
                                      backend="cuda")
        cases.append({"dtype": dtype, "aligned": aligned, "sampling_ratio": sampling_ratio,
                      "output": output.detach(), "per_map": per_map, "grads": [m.grad for m in leaves]})
    inputs = levels_inputs(torch.float64)
    pooler = MultiScaleRoIPooler(2, (2, 3, 4, 5, 6), "align", sampling_ratio=2)
    pooled = pooler.pool_all_levels(inputs["pyramid"], inputs["pooler_rois"], backend="cuda")
    bf16 = [m.to(torch.bfloat16) for m in inputs["pyramid"]]
    pooled_bf16 = pooler.pool_all_levels(bf16, inputs["pooler_rois"].float(), backend="cuda")
    leaves = [m.clone().requires_grad_() for m in inputs["maps"]]
    gradcheck = torch.autograd.gradcheck(
        lambda *maps: roi_align_levels(list(maps), inputs["rois"], inputs["roi_levels"], 2, inputs["scales"], 2,
                                       backend="cuda"),
        tuple(leaves), fast_mode=True, raise_exception=False)
    return {"cases": cases, "pooled": pooled, "pooled_bf16": pooled_bf16, "gradcheck": gradcheck}


def record_pool_warp_levels_cases() -> dict:
    """The pooler's one-launch path on the CUDA backend for roi_pool_levels / roi_warp_levels
    (roi_op pool, warp, warp_max, align_max; float64 pyramid, outputs and the gradients of a ramp);
    and float32 roi_pool_levels / roi_warp_levels (max, quantized or not) on three maps beside one
    CUDA call per map, outputs and gradients."""
    from minimrcnn.modeling.poolers import MultiScaleRoIPooler
    from minimrcnn.ops.roi_pool import roi_pool, roi_pool_levels
    from minimrcnn.ops.roi_warp import roi_warp, roi_warp_levels

    inputs = levels_inputs(torch.float64)
    poolers = {}
    for roi_op in ("pool", "warp", "warp_max", "align_max"):
        pooler = MultiScaleRoIPooler(2, (2, 3, 4, 5, 6), roi_op, sampling_ratio=2)
        leaves = [m.clone().requires_grad_() for m in inputs["pyramid"]]
        pooled = pooler.pool_all_levels(leaves, inputs["pooler_rois"], backend="cuda")
        pooled.backward(torch.arange(pooled.numel(), dtype=pooled.dtype).reshape(pooled.shape))
        poolers[roi_op] = {"pooled": pooled.detach(), "grads": [m.grad for m in leaves]}
    inputs = levels_inputs(torch.float32)
    maps, rois, roi_levels, scales = inputs["maps"], inputs["rois"], inputs["roi_levels"], inputs["scales"]
    ops = {"pool": (roi_pool_levels, lambda m, r, s: roi_pool(m, r, 2, s, "cuda"), ()),
           "warp_max": (roi_warp_levels, lambda m, r, s: roi_warp(m, r, 2, s, 2, True, True, "max", "cuda"),
                        (2, True, True, "max")),
           "align_max": (roi_warp_levels, lambda m, r, s: roi_warp(m, r, 2, s, 0, False, False, "max", "cuda"),
                         (0, False, False, "max"))}
    float32 = {}
    for name, (levels_op, per_map_op, args) in ops.items():
        leaves = [m.clone().requires_grad_() for m in maps]
        output = levels_op(leaves, rois, roi_levels, 2, scales, *args, backend="cuda")
        output.backward(torch.ones_like(output))
        separate = [m.clone().requires_grad_() for m in maps]
        per_map = torch.zeros_like(output)
        for level, (level_map, scale) in enumerate(zip(separate, scales)):
            rows = roi_levels == level
            pooled = per_map_op(level_map, rois[rows], scale)
            pooled.backward(torch.ones_like(pooled))
            per_map[rows] = pooled.detach()
        float32[name] = {"output": output.detach(), "grads": [m.grad for m in leaves], "per_map": per_map,
                         "per_map_grads": [m.grad for m in separate]}
    return {"poolers": poolers, "float32": float32}


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
def run_under_simulator(timeout: float = 900) -> dict:  # a hang guard; a loaded 2-core machine takes minutes
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
