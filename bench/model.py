"""Benchmark the whole Mask R-CNN: training iterations/s and inference images/s.

    python bench/model.py                      # shapes-cpu on the CPU (batch 8, 128 x 128)
    python bench/model.py --device cuda        # shapes-gpu and coco-r50-fpn on the GPU
    python bench/model.py --configs shapes-cpu --batch-size 4 --threads 2 --append

Inputs are synthetic (random images with random rectangle and ellipse instances)
at each preset's working size: shapes presets use 128 x 128 images, coco-r50-fpn
random COCO-sized images (480-640 x 640, resized by the model to its 800-pixel short side).
A training iteration is forward + backward + SGD step; inference is ``model.predict``.
With --append the table goes into bench/RESULTS.md under "## Model".
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from minimrcnn import MaskRCNN, get_config

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Model"
# (config, training batch, image height range, image width, instances per image)
WORKLOADS = {
    "shapes-cpu": (8, (128, 128), 128, 6),
    "shapes-gpu": (16, (128, 128), 128, 6),
    "coco-r50-fpn": (2, (480, 640), 640, 7),
}


def synthetic_batch(batch_size, height_range, width, num_instances, num_classes, generator, device):
    """Random images [3, H, W] in [0, 1] and targets with rectangle/ellipse masks."""
    images, targets = [], []
    for _ in range(batch_size):
        height = int(torch.randint(height_range[0], height_range[1] + 1, (), generator=generator))
        image = torch.rand(3, height, width, generator=generator)
        boxes, masks = [], []
        rows = torch.arange(height)[:, None].float()
        cols = torch.arange(width)[None, :].float()
        for _ in range(num_instances):
            size = torch.rand(2, generator=generator) * torch.tensor([width, height]) * 0.35 + 6
            corner = torch.rand(2, generator=generator) * (torch.tensor([width, height]) - size)
            x0, y0 = corner.tolist()
            x1, y1 = (corner + size).tolist()
            if torch.rand((), generator=generator) < 0.5:
                mask = (rows >= int(y0)) & (rows < int(y1)) & (cols >= int(x0)) & (cols < int(x1))
            else:
                cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
                mask = ((cols + 0.5 - cx) / rx) ** 2 + ((rows + 0.5 - cy) / ry) ** 2 <= 1
            ys, xs = torch.nonzero(mask, as_tuple=True)
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            masks.append(mask.to(torch.uint8))
            image[:, mask] = torch.rand(3, 1, generator=generator)
        images.append(image.to(device))
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
            "labels": torch.randint(1, num_classes, (num_instances,), generator=generator).to(device),
            "masks": torch.stack(masks).to(device),
            "iscrowd": torch.zeros(num_instances, dtype=torch.int64, device=device),
        })
    return images, targets


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, iterations, warmup, device) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call of ``fn`` after ``warmup`` calls.

    CPU seconds add up the work of all threads; on a shared machine they are a steadier
    measure of the work than wall time (other processes do not inflate them).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    wall, cpu = [], []
    for _ in range(iterations):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = len(wall) // 2
    return sorted(wall)[median], sorted(cpu)[median]


def bench_config(name, device, iterations, warmup, batch_size=None):
    config = get_config(name)
    default_batch, height_range, width, num_instances = WORKLOADS[name]
    batch_size = batch_size or default_batch
    generator = torch.Generator().manual_seed(0)
    images, targets = synthetic_batch(batch_size, height_range, width, num_instances,
                                      config.num_classes, generator, device)
    torch.manual_seed(0)
    model = MaskRCNN(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    use_autocast = device.type == "cuda" and autocast_dtype is not None

    def train_step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def predict():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            model.predict(images)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_seconds, train_cpu_seconds = time_calls(train_step, iterations, warmup, device)
    train_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    predict_seconds, _ = time_calls(predict, iterations, warmup, device)
    predict_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "config": name,
        "batch": batch_size,
        "image": f"{height_range[0]}-{height_range[1]}x{width}" if height_range[0] != height_range[1]
        else f"{height_range[0]}x{width}",
        "train s/iter": train_seconds,
        "train cpu-s/iter": train_cpu_seconds,
        "train iter/s": 1 / train_seconds,
        "infer img/s": batch_size / predict_seconds,
        "train peak GiB": train_memory,
        "infer peak GiB": predict_memory,
    }


def format_table(rows) -> str:
    columns = ["config", "batch", "image", "train s/iter", "train cpu-s/iter", "train iter/s", "infer img/s",
               "train peak GiB", "infer peak GiB"]

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device, note: str = "") -> str:
    if device.type == "cuda":
        described = torch.cuda.get_device_name(device)
    else:
        described = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    return f"{described}, {note}" if note else described


def append_results(table: str, command: str, device, path: Path = RESULTS, note: str = "") -> None:
    """Add a dated entry at the end of the "## Model" section of ``path`` (bench/RESULTS.md)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (f"### {stamp} — {machine_description(device, note)}\n\n`{command}` "
             f"(torch {torch.__version__})\n\n{table}\n")
    insert_entry(entry, path)


def insert_entry(entry: str, path: Path = RESULTS) -> None:
    """Insert ``entry`` (markdown) at the end of the "## Model" section, creating what is missing;
    other sections of the file are left as they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nTraining iterations/s (forward + backward + SGD step) " \
            "and inference images/s of the whole model (bench/model.py).\n"
    start = text.index(SECTION) + len(SECTION)
    next_section = text.find("\n## ", start)
    end = len(text) if next_section < 0 else next_section
    text = text[:end].rstrip("\n") + "\n\n" + entry.strip("\n") + "\n" + text[end:]
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(WORKLOADS),
                        help="default: shapes-cpu on cpu; shapes-gpu and coco-r50-fpn on cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="override every workload's batch")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS, help="file for --append")
    parser.add_argument("--note", default="", help="a remark appended to the machine description")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    configs = args.configs or (["shapes-cpu"] if device.type == "cpu" else ["shapes-gpu", "coco-r50-fpn"])
    rows = []
    for name in configs:
        try:
            rows.append(bench_config(name, device, args.iters, args.warmup, args.batch_size))
        except Exception as exc:  # report and go on with the other configs
            print(f"{name}: failed with {type(exc).__name__}: {exc}", flush=True)
            continue
        print(format_table(rows[-1:]), flush=True)
    table = format_table(rows)
    print(f"\n{machine_description(device, args.note)}\n{table}")
    if args.append:
        import sys

        arguments = list(sys.argv[1:])
        if "--note" in arguments:  # the note already heads the entry
            del arguments[arguments.index("--note") : arguments.index("--note") + 2]
        append_results(table, "python " + " ".join(["bench/model.py", *arguments]), device,
                       args.results, args.note)


if __name__ == "__main__":
    main()
