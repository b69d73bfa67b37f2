"""Correctness of the CUDA backends on a real GPU (run by hand on a CUDA machine).

    python bench/gpu_check.py

Compares ``backend="cuda"`` on CUDA tensors with the float64 NumPy reference
(forward and backward, RoIAlign and RoIPool, random RoIs including ones partly or wholly
outside the map, tiny and huge, aligned or not, sampling ratios -1/0/2) and runs
``torch.autograd.gradcheck`` in float64 on the GPU. Then one MaskRCNN training step and
one prediction on the GPU. Prints the largest errors and exits non-zero on a failure.
"""

from __future__ import annotations

import sys

import torch

from minimrcnn.ops.roi_align import random_rois, roi_align
from minimrcnn.ops.roi_pool import roi_pool

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def check_op(name, op, kwargs_list, generator, device):
    worst = {}
    for dtype in (torch.float32, torch.float64):
        for kwargs in kwargs_list:
            features = torch.randn(2, 3, 11, 13, generator=generator, dtype=torch.float64)
            rois = random_rois(generator, 18, 2, 11, 13, kwargs.get("spatial_scale", 1.0))
            outputs, grads = [], []
            for backend, where in (("reference", "cpu"), ("cuda", device)):
                leaf = features.detach().to(dtype).to(where).clone().requires_grad_(True)
                output = op(leaf, rois.to(dtype).to(where), backend=backend, **kwargs)
                grad_output = torch.linspace(-1, 1, output.numel(), dtype=dtype).reshape(output.shape)
                output.backward(grad_output.to(where))
                outputs.append(output.detach().cpu().double())
                grads.append(leaf.grad.cpu().double())
            error = max((outputs[0] - outputs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max().item())
            worst[dtype] = max(worst.get(dtype, 0.0), error)
    ok = all(worst[dtype] <= TOLERANCE[dtype] for dtype in worst)
    for dtype, error in worst.items():
        print(f"{name:10s} {str(dtype):14s} max |cuda - reference| = {error:.3e}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    device = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(device))
    generator = torch.Generator().manual_seed(0)
    align_cases = [dict(output_size=(2, 3), spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
                   for scale in (1.0, 0.25) for ratio in (-1, 0, 2) for aligned in (True, False)]
    pool_cases = [dict(output_size=(2, 3), spatial_scale=scale) for scale in (1.0, 0.25)]
    ok = check_op("roi_align", roi_align, align_cases, generator, device)
    ok &= check_op("roi_pool", roi_pool, pool_cases, generator, device)

    features = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(generator, 4, 1, 6, 7).to(device)
    for name, fn in (("roi_align", lambda f: roi_align(f, rois, 3, 1.0, 2, backend="cuda")),
                     ("roi_pool", lambda f: roi_pool(f, rois, 3, 1.0, backend="cuda"))):
        passed = torch.autograd.gradcheck(fn, (features,), eps=1e-6, atol=1e-5, nondet_tol=1e-12)
        print(f"{name:10s} gradcheck float64 on GPU: {passed}")
        ok &= passed

    from minimrcnn import MaskRCNN, get_config

    model = MaskRCNN(get_config("shapes-gpu")).to(device)
    images = [torch.rand(3, 128, 128, device=device) for _ in range(2)]
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8, device=device)
    masks[0, 10:50, 20:70] = 1
    masks[1, 60:120, 60:100] = 1
    target = {"boxes": torch.tensor([[20.0, 10, 70, 50], [60.0, 60, 100, 120]], device=device),
              "labels": torch.tensor([1, 2], device=device), "masks": masks}
    losses = model(images, [target, target])
    sum(losses.values()).backward()
    predictions = model.predict(images)
    print("model step on GPU:", {k: round(v.item(), 4) for k, v in losses.items()},
          "detections:", [len(p["scores"]) for p in predictions])
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
