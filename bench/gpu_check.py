"""One command for a GPU machine (about 8 minutes at most): correctness, syncs, speed and AP.

    python bench/gpu_check.py OUT.json            # on a CUDA machine; writes OUT.json and OUT.md
    python bench/gpu_check.py --dry-run OUT.json  # every section on the CPU at tiny sizes

Sections (each one runs even when an earlier one failed; a failure is recorded, not raised):

1. ops: ``backend="cuda"`` on CUDA tensors against the float64 NumPy reference, forward and
   backward, RoIAlign (sampling ratios -1/0/2, aligned or not) and RoIPool (including 28 x 28
   bins at spatial_scale 1/16, where float32 bin edges matter), float32 and float64; then
   ``torch.autograd.gradcheck`` in float64 on the GPU.
2. syncs: one ``shapes-gpu`` training step (16 images) under ``torch.cuda.set_sync_debug_mode("warn")``,
   counting the warnings torch raises for each host-device synchronisation (ops the host waits on;
   Numba's own launches are not seen by torch), next to the CPU proxy count of
   ``minimrcnn.engine.step_ops.count_step_ops`` for the same batch.
3. speed: ``shapes-gpu`` (batch 16, 128 x 128) and ``coco-r50-fpn`` (batch 2, 480-640 x 640 resized to
   800) training iterations/s and inference images/s with peak memory (bench/model.py's synthetic
   workload), and torchvision's ``maskrcnn_resnet50_fpn`` (random weights) on the same images,
   batch, resize and autocast setting, when torchvision imports (the package never imports it).
4. demo: a short ``shapes-gpu`` training on a freshly generated shapes set, COCO-evaluated: AP.

--dry-run runs the same code on the CPU: the ops with the Numba CPU backend in place of the CUDA
one, tiny batches and images, one timed iteration, a 2-iteration demo on a 16/8-image set; what
needs CUDA (sync debug mode, peak memory) is skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import WORKLOADS, cpu_name, synthetic_batch, time_calls  # noqa: E402  (bench/model.py)

from minimrcnn import MaskRCNN, get_config  # noqa: E402
from minimrcnn.ops.roi_align import random_rois, roi_align  # noqa: E402
from minimrcnn.ops.roi_pool import roi_pool  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
TOTAL_BUDGET_SECONDS = 8 * 60  # the whole command; the demo gets what the other sections leave
DEMO_MAX_MINUTES = 2.5
SYNC_WARNING = "synchroniz"  # torch's sync-debug warning says "called a synchronizing CUDA operation"


# ---------------------------------------------------------------------------
# 1. ops against the float64 reference, gradcheck
# ---------------------------------------------------------------------------


def check_op(op, cases, generator, device, backend, map_size=(11, 13), num_rois=18):
    """Largest |backend - reference| / max(1, max |reference|) over forward and backward, per dtype."""
    height, width = map_size
    worst = {}
    for dtype in (torch.float32, torch.float64):
        for kwargs in cases:
            features = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
            rois = random_rois(generator, num_rois, 2, height, width, kwargs.get("spatial_scale", 1.0))
            outputs, grads = [], []
            for name, where in (("reference", "cpu"), (backend, device)):
                leaf = features.to(dtype).to(where).clone().requires_grad_(True)
                output = op(leaf, rois.to(dtype).to(where), backend=name, **kwargs)
                grad_output = torch.linspace(-1, 1, output.numel(), dtype=dtype).reshape(output.shape)
                output.backward(grad_output.to(where))
                outputs.append(output.detach().cpu().double())
                grads.append(leaf.grad.cpu().double())
            # relative to the largest reference value: a float32 gradient sums many cells' gradients
            error = max(((ours - reference).abs().max() / reference.abs().max().clamp(min=1)).item()
                        for reference, ours in (outputs, grads))
            worst[str(dtype)] = max(worst.get(str(dtype), 0.0), error)
    return worst


def section_ops(device, backend, dry_run):
    generator = torch.Generator().manual_seed(0)
    align_cases = [dict(output_size=(2, 3), spatial_scale=scale, sampling_ratio=ratio, aligned=aligned)
                   for scale in (1.0, 0.25) for ratio in (-1, 0, 2) for aligned in (True, False)]
    pool_cases = [dict(output_size=(2, 3), spatial_scale=scale) for scale in (1.0, 0.25)]
    # the mask head's RoIPool shape: 28 x 28 bins on a stride-16 map, where float32 edges differ
    pool28 = [dict(output_size=28, spatial_scale=1 / 16)]
    result = {"backend": backend, "max_abs_error": {
        "roi_align": check_op(roi_align, align_cases, generator, device, backend),
        "roi_pool": check_op(roi_pool, pool_cases, generator, device, backend),
        "roi_pool 28x28 @1/16": check_op(roi_pool, pool28, generator, device, backend, (40, 44), 6 if dry_run else 24),
    }}
    features = torch.randn(1, 2, 6, 7, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(generator, 4, 1, 6, 7).to(device)
    result["gradcheck"] = {
        name: torch.autograd.gradcheck(fn, (features,), eps=1e-6, atol=1e-5, nondet_tol=1e-12, raise_exception=False)
        for name, fn in (("roi_align", lambda f: roi_align(f, rois, 3, 1.0, 2, backend=backend)),
                         ("roi_pool", lambda f: roi_pool(f, rois, 3, 1.0, backend=backend)))}
    errors_ok = all(error <= TOLERANCE[torch.float32 if "float32" in dtype else torch.float64]
                    for per_dtype in result["max_abs_error"].values() for dtype, error in per_dtype.items())
    result["ok"] = errors_ok and all(result["gradcheck"].values())
    return result


# ---------------------------------------------------------------------------
# 2. host-device syncs of one training step
# ---------------------------------------------------------------------------


def count_cuda_syncs(step):
    """Run step() under sync debug mode "warn"; the number of sync warnings torch raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.current_stream().synchronize()  # (not through torch ops: not counted)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def section_syncs(device, dry_run):
    from minimrcnn.engine.step_ops import count_step_ops

    config = get_config("shapes-gpu")
    batch = 2 if dry_run else WORKLOADS["shapes-gpu"][0]
    generator = torch.Generator().manual_seed(0)
    images, targets = synthetic_batch(batch, (128, 128), 128, 6, config.num_classes, generator, torch.device("cpu"))
    torch.manual_seed(0)
    model = MaskRCNN(config).train()
    proxy = count_step_ops(model, images, targets, with_sites=False)
    result = {"batch": batch, "cpu_proxy_aten_ops": proxy.total, "cpu_proxy_sync_ops": proxy.syncs}
    if device.type != "cuda":
        result["cuda_syncs"] = None
        result["skipped"] = "torch.cuda.set_sync_debug_mode needs CUDA"
        print("  syncs: skipped the CUDA count (", result["skipped"], ")", flush=True)
        return result
    model = model.to(device)
    images = [image.to(device) for image in images]
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]

    def step():
        losses = model(images, targets)
        sum(losses.values()).backward()

    step()  # compiles the kernels, fills the anchor cache
    result["cuda_syncs"] = count_cuda_syncs(step)
    return result


# ---------------------------------------------------------------------------
# 3. speed, side by side with torchvision
# ---------------------------------------------------------------------------


def workload(name, dry_run):
    """(config, batch, image height range, width, instances) at full or dry-run size."""
    config = get_config(name)
    batch, height_range, width, instances = WORKLOADS[name]
    if dry_run:  # tiny: 2 images (1 for R50) of 64 x 64, the model resizing to 64 too
        batch, height_range, width = (1 if name == "coco-r50-fpn" else 2), (64, 64), 64
        config = dataclasses.replace(config, min_size=(64,), min_size_test=64, max_size=64)
    return config, batch, height_range, width, instances


def autocast_dtype(config, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    return dtype if device.type == "cuda" else None


def time_model(model, images, targets, dtype, device, iterations, warmup):
    """Train step (forward, backward, SGD) and predict timings, with CUDA peak memory."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def predict():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model.predict(images) if hasattr(model, "predict") else model(images)

    peak = {}
    row = {}
    for name, fn, mode in (("train", train_step, True), ("infer", predict, False)):
        model.train(mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = time_calls(fn, iterations, warmup, device)
        peak[name] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row[name] = seconds
    return {"train it/s": 1 / row["train"], "infer img/s": len(images) / row["infer"],
            "train peak GiB": peak["train"], "infer peak GiB": peak["infer"]}


def torchvision_model(config):
    """torchvision's Mask R-CNN R50-FPN, random weights, with our config's classes and resize."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=config.num_classes,
                                 min_size=config.min_size, max_size=config.max_size)


def section_speed(device, dry_run):
    iterations, warmup = (1, 0) if dry_run else (10, 3)
    try:
        import torchvision  # noqa: F401
        torchvision_reason = None
    except ImportError as error:
        torchvision_reason = f"torchvision does not import ({error})"
        print("  speed: torchvision skipped:", torchvision_reason, flush=True)
    rows = []
    for name in ("shapes-gpu", "coco-r50-fpn"):
        config, batch, height_range, width, instances = workload(name, dry_run)
        generator = torch.Generator().manual_seed(0)
        images, targets = synthetic_batch(batch, height_range, width, instances, config.num_classes, generator,
                                          device)
        dtype = autocast_dtype(config, device)
        common = {"config": name, "batch": batch, "image": f"{height_range[0]}-{height_range[1]}x{width}",
                  "amp": str(dtype).replace("torch.", "") if dtype else "none"}
        builders = [("minimrcnn", lambda: MaskRCNN(config))]
        if torchvision_reason is None:
            builders.append(("torchvision maskrcnn_resnet50_fpn", lambda: torchvision_model(config)))
        for model_name, build in builders:
            try:
                torch.manual_seed(0)
                row = time_model(build().to(device), images, targets, dtype, device, iterations, warmup)
                rows.append({**common, "model": model_name, **row})
            except Exception as error:  # one failing model does not hide the others
                rows.append({**common, "model": model_name, "error": f"{type(error).__name__}: {error}"})
            print("  ", rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"iterations": iterations, "warmup": warmup, "rows": rows, "torchvision_skipped": torchvision_reason}


# ---------------------------------------------------------------------------
# 4. a short shapes-gpu demo with AP
# ---------------------------------------------------------------------------


def section_demo(device, dry_run, minutes):
    from minimrcnn.data.shapes import generate_shapes
    from minimrcnn.engine.train import train

    config = get_config("shapes-gpu")
    with tempfile.TemporaryDirectory() as folder:
        sizes = dict(num_train=16, num_val=8) if dry_run else dict(num_train=1000, num_val=200)
        start = time.perf_counter()
        root = generate_shapes(Path(folder) / "shapes", **sizes)
        data_seconds = time.perf_counter() - start
        if dry_run:
            config = dataclasses.replace(config, batch_size=2)
        summary = train(config, Path(folder) / "run", data_root=root, device=device, progress=False,
                        max_iter=2 if dry_run else None,
                        time_budget_minutes=None if dry_run else minutes - data_seconds / 60)
    return {"data": sizes, "data_seconds": round(data_seconds, 1), "iterations": summary["iterations"],
            "train_seconds": summary["train_seconds"], "segm": summary["segm"], "bbox": summary["bbox"]}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def markdown(results):
    lines = [f"### bench/gpu_check.py, {results['date']} — {results['device']}", "",
             f"`{results['command']}` (torch {results['torch']}, {results['seconds']:.0f} s"
             + (", DRY RUN on the CPU: not a measurement" if results["dry_run"] else "") + ")", ""]
    for name, section in results["sections"].items():
        if "error" in section:
            lines += [f"- {name}: FAILED: {section['error'].splitlines()[-1]}"]
            continue
        if name == "ops":
            errors = "; ".join(f"{op} " + ", ".join(f"{d.replace('torch.', '')} {e:.1e}" for d, e in per.items())
                               for op, per in section["max_abs_error"].items())
            lines += [f"- ops ({section['backend']} vs float64 reference): {'OK' if section['ok'] else 'FAILED'}; "
                      f"max relative error {errors}; gradcheck {section['gradcheck']}"]
        elif name == "syncs":
            counted = section["cuda_syncs"]
            counted = counted if counted is not None else f"not counted ({section['skipped']})"
            lines += [f"- syncs, one shapes-gpu step of {section['batch']} images: CUDA sync warnings {counted}; "
                      f"CPU proxy {section['cpu_proxy_sync_ops']} sync-forcing of "
                      f"{section['cpu_proxy_aten_ops']} aten ops"]
        elif name == "demo":
            segm, bbox, data = section["segm"], section["bbox"], section["data"]
            lines += [f"- demo: shapes-gpu, {section['iterations']} iterations in {section['train_seconds']:.0f} s "
                      f"({data['num_train']} train / {data['num_val']} val images): segm AP {segm['AP']:.3f} "
                      f"(AP50 {segm['AP50']:.3f}), bbox AP {bbox['AP']:.3f}"]
        elif name == "speed":
            if section["torchvision_skipped"]:
                lines += [f"- speed: torchvision skipped: {section['torchvision_skipped']}"]
            columns = ["config", "model", "batch", "image", "amp", "train it/s", "infer img/s", "train peak GiB",
                       "infer peak GiB"]
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for row in section["rows"]:
                cells = [row.get(c, "-") for c in columns]
                if "error" in row:
                    cells[columns.index("train it/s")] = "failed: " + row["error"]
                lines += ["| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v if v is not None else "-")
                                            for v in cells) + " |"]
            lines += [""]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="results file (JSON); the markdown goes beside it as .md")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    parser.add_argument("--sections", nargs="+", default=["ops", "syncs", "speed", "demo"],
                        choices=["ops", "syncs", "speed", "demo"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        device, backend = torch.device("cpu"), "numba"
        print("dry run: on the CPU, ops with the numba backend in place of cuda, tiny sizes", flush=True)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to try the script on the CPU")
    else:
        device, backend = torch.device("cuda"), "cuda"
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})",
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "dry_run": args.dry_run, "sections": {},
    }
    runners = {
        "ops": lambda: section_ops(device, backend, args.dry_run),
        "syncs": lambda: section_syncs(device, args.dry_run),
        "speed": lambda: section_speed(device, args.dry_run),
        "demo": lambda: section_demo(device, args.dry_run, min(
            DEMO_MAX_MINUTES, (TOTAL_BUDGET_SECONDS - (time.perf_counter() - start)) / 60 - 0.75)),
    }
    for name in args.sections:
        print(f"== {name}", flush=True)
        section_start = time.perf_counter()
        try:
            results["sections"][name] = runners[name]()
        except Exception:
            results["sections"][name] = {"error": traceback.format_exc()}
            print(results["sections"][name]["error"], flush=True)
        results["sections"][name]["seconds"] = round(time.perf_counter() - section_start, 1)
        results["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")  # partial results survive a kill
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    failed = [name for name, section in results["sections"].items()
              if "error" in section or section.get("ok") is False]
    print("FAILED: " + ", ".join(failed) if failed else "ALL RAN", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
