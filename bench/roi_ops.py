"""Benchmark RoIAlign and RoIPool: our backends side by side with torchvision; and the
max-reduction ops of the Table 2c ablation (RoIWarp max, RoIAlign max) beside our RoIAlign.

    python bench/roi_ops.py                  # CPU: numba vs torchvision (+ reference on a small case)
    python bench/roi_ops.py --device cuda    # GPU: our numba.cuda kernels vs torchvision's CUDA kernels
    python bench/roi_ops.py --device cuda --check   # CUDA results vs the numba CPU results

Case (the issue's): features [2, 256, 64, 64] (a stride-4 map of a 256x256 image),
512 RoIs with random centres and sides of 16..128 image pixels, outputs 7x7 and
14x14, sampling_ratio 2, aligned. Every number in one table comes from one run,
so ratios compare like with like. Times are the minimum over --repeat runs after
one warm-up (the minimum is the least disturbed by other work on the machine), and
the backends take turns within each run.
Backward is timed alone: a fresh untimed forward, then output.backward(grad).
"""

import argparse
import platform
import time

import numba
import torch

from minimrcnn.modeling.poolers import WARP_OPS
from minimrcnn.ops import roi_align, roi_pool, roi_warp

try:
    import torchvision.ops

    TORCHVISION = torchvision.__version__
except ImportError:  # the benchmark still runs, without the comparison
    TORCHVISION = None

SPATIAL_SCALE = 0.25
SAMPLING_RATIO = 2
SMALL_CASE = dict(num_images=1, channels=16, size=32, num_rois=16)  # for the slow NumPy reference


def make_case(num_images=2, channels=256, size=64, num_rois=512, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, channels, size, size, generator=generator)
    image_size = size / SPATIAL_SCALE
    centres = torch.rand(num_rois, 2, generator=generator) * image_size
    sides = 16 + torch.rand(num_rois, 2, generator=generator) * 112
    batch_index = torch.randint(num_images, (num_rois, 1), generator=generator).float()
    rois = torch.cat([batch_index, centres - sides / 2, centres + sides / 2], dim=1)
    return features.to(device), rois.to(device)


def op_call(op, backend, output_size):
    """-> fn(features, rois) for our ops (backend name) or torchvision's (backend 'torchvision')."""
    if backend == "torchvision":
        if op == "roi_align":
            return lambda f, r: torchvision.ops.roi_align(f, r, output_size, SPATIAL_SCALE, SAMPLING_RATIO, True)
        return lambda f, r: torchvision.ops.roi_pool(f, r, output_size, SPATIAL_SCALE)
    if op == "roi_align":
        return lambda f, r: roi_align(f, r, output_size, SPATIAL_SCALE, SAMPLING_RATIO, True, backend=backend)
    return lambda f, r: roi_pool(f, r, output_size, SPATIAL_SCALE, backend=backend)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_forward_backward(fns, features, rois, repeat, device):
    """{name: (forward ms, backward ms)}, each the minimum over `repeat` runs after a warm-up.

    The backends take turns within each run, so that a burst of other work on
    the machine slows them alike instead of one of them.
    """
    leaves = {name: features.clone().requires_grad_() for name in fns}
    grad = None
    times = {name: ([], []) for name in fns}
    for run in range(repeat + 1):
        for name, fn in fns.items():
            leaf = leaves[name]
            leaf.grad = None
            synchronize(device)
            start = time.perf_counter()
            output = fn(leaf, rois)
            synchronize(device)
            middle = time.perf_counter()
            if grad is None:
                grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(device)
            output.backward(grad)
            synchronize(device)
            end = time.perf_counter()
            if run > 0:
                times[name][0].append(middle - start)
                times[name][1].append(end - middle)
    return {name: (1e3 * min(forward), 1e3 * min(backward)) for name, (forward, backward) in times.items()}


def print_table(rows, baseline):
    print(f"{'op':<10} {'output':>6} {'pass':<8} " + " ".join(f"{name:>12}" for name in rows[0][3]) +
          (f" {'ratio':>7}" if baseline else ""))
    for op, size, phase, times in rows:
        line = f"{op:<10} {size:>4}x{size:<1} {phase:<8} " + " ".join(f"{t:>10.2f}ms" for t in times.values())
        if baseline:
            ours = [t for name, t in times.items() if name != baseline][0]
            line += f" {ours / times[baseline]:>7.3f}"
        print(line)


def run_benchmark(device, backends, repeat, case_kwargs, sizes):
    features, rois = make_case(device=device, **case_kwargs)
    rows = []
    for op in ("roi_align", "roi_pool"):
        for size in sizes:
            fns = {name: op_call(op, name, size) for name in backends}
            results = time_forward_backward(fns, features, rois, repeat, device)
            for phase_index, phase in enumerate(("forward", "backward")):
                rows.append((op, size, phase, {name: results[name][phase_index] for name in backends}))
    return rows


# the ablation's max-reduction ops (notebook 08, Table 2c): the pooler's roi_op -> roi_warp's (quantize, reduction)
MAX_OPS = {name: op for name, op in WARP_OPS.items() if op[1] == "max"}


def run_max_ops(device, backend, repeat, case_kwargs, sizes):
    """Rows of (op, size, phase, {roi_align, warp_max, align_max: ms}) on one backend, taking turns."""
    features, rois = make_case(device=device, **case_kwargs)
    rows = []
    for size in sizes:
        fns = {"roi_align": op_call("roi_align", backend, size)}
        for name, (quantize, reduction) in MAX_OPS.items():
            fns[name] = (lambda q, r, s: lambda f, b: roi_warp(f, b, s, SPATIAL_SCALE, SAMPLING_RATIO, True, q, r,
                                                               backend=backend))(quantize, reduction, size)
        results = time_forward_backward(fns, features, rois, repeat, device)
        for phase_index, phase in enumerate(("forward", "backward")):
            rows.append(("max ops", size, phase, {name: results[name][phase_index] for name in fns}))
    return rows


def print_max_ops(rows):
    print(f"{'output':>6} {'pass':<8} {'roi_align':>10} {'warp_max':>10} {'align_max':>10}  ratios to roi_align")
    for _, size, phase, times in rows:
        base = times["roi_align"]
        print(f"{size:>4}x{size:<1} {phase:<8} " + " ".join(f"{times[name]:>8.2f}ms" for name in times)
              + "  " + " ".join(f"{times[name] / base:>5.2f}" for name in MAX_OPS))


def check_cuda_against_numba(case_kwargs, sizes):
    """Max |cuda - numba CPU| for both ops' outputs and gradients on the benchmark case."""
    features, rois = make_case(**case_kwargs)
    worst = 0.0
    for op in ("roi_align", "roi_pool"):
        for size in sizes:
            results = {}
            for backend, device in (("numba", "cpu"), ("cuda", "cuda")):
                leaf = features.to(device, copy=True).requires_grad_()
                output = op_call(op, backend, size)(leaf, rois.to(device))
                grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(1)).to(device)
                output.backward(grad)
                results[backend] = (output.detach().cpu(), leaf.grad.cpu())
            output_error = (results["cuda"][0] - results["numba"][0]).abs().max().item()
            grad_error = (results["cuda"][1] - results["numba"][1]).abs().max().item()
            worst = max(worst, output_error, grad_error)
            print(f"{op:<10} {size:>2}x{size:<2} max |cuda - numba|: output {output_error:.2e}, grad {grad_error:.2e}")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--check", action="store_true", help="compare CUDA results with numba CPU results")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    sizes = (7, 14)
    case = dict(num_images=2, channels=256, size=64, num_rois=512)

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.get_num_threads()} threads, layer {numba.config.THREADING_LAYER}), "
          f"torchvision {TORCHVISION or 'not importable: no comparison'}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        print(f"GPU: {torch.cuda.get_device_name()}")
        if args.check:
            worst = check_cuda_against_numba(case, sizes)
            tolerance = 1e-4  # float32; both sum in different orders
            print(f"check {'passed' if worst <= tolerance else 'FAILED'}: worst {worst:.2e} (tolerance {tolerance})")
        backends = ["cuda"] + (["torchvision"] if TORCHVISION else [])
        print(f"\nfeatures [2, 256, 64, 64], 512 RoIs, sampling_ratio {SAMPLING_RATIO}, aligned, on {args.device}")
        print_table(run_benchmark("cuda", backends, args.repeat, case, sizes), "torchvision" if TORCHVISION else None)
        print("\nThe ablation's max-reduction ops (roi_warp, cuda) beside our roi_align (cuda), same case")
        print_max_ops(run_max_ops("cuda", "cuda", args.repeat, case, sizes))
        return

    backends = ["numba"] + (["torchvision"] if TORCHVISION else [])
    print(f"\nfeatures [2, 256, 64, 64], 512 RoIs, sampling_ratio {SAMPLING_RATIO}, aligned, on cpu "
          "(ratio = numba / torchvision)")
    print_table(run_benchmark("cpu", backends, args.repeat, case, sizes), "torchvision" if TORCHVISION else None)

    print("\nThe ablation's max-reduction ops (roi_warp, numba) beside our roi_align (numba), same case")
    print_max_ops(run_max_ops("cpu", "numba", args.repeat, case, sizes))

    small = SMALL_CASE
    print(f"\nNumPy reference backend (slow by design) on a small case: features [{small['num_images']}, "
          f"{small['channels']}, {small['size']}, {small['size']}], {small['num_rois']} RoIs "
          "(ratio = reference / numba)")
    rows = run_benchmark("cpu", ["reference", "numba"], 2, small, sizes)
    for op, size, phase, times in rows:
        print(f"{op:<10} {size:>4}x{size:<1} {phase:<8} reference {times['reference']:>9.1f}ms  "
              f"numba {times['numba']:>7.2f}ms  ratio {times['reference'] / times['numba']:>8.0f}")


if __name__ == "__main__":
    main()
