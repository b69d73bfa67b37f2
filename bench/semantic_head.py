"""What Panoptic FPN's semantic branch costs per training step: shapes-cpu vs shapes-cpu-panoptic.

    python bench/semantic_head.py [--steps 10] [--threads 1] [--data data/shapes]

Both models train on the same real shapes batches (``CocoPanoptic``, batch 8, 128 x 128);
steps alternate between the two models so that a change of machine load hits both alike.
Reported per step: process CPU time (less sensitive to other processes than wall time) and
wall time, medians over the timed steps (the first two of each model are warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minimrcnn import MaskRCNN, get_config
from minimrcnn.data import collate
from minimrcnn.data.panoptic import shapes_panoptic
from minimrcnn.engine.train import build_optimizer

WARMUP_STEPS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="data/shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = shapes_panoptic(args.data, "train")
    models = {}
    for name in ("shapes-cpu", "shapes-cpu-panoptic"):
        config = get_config(name)
        torch.manual_seed(0)
        model = MaskRCNN(config).train()
        models[name] = (model, build_optimizer(model, config), config)
    timings = {name: ([], []) for name in models}
    for step in range(WARMUP_STEPS + args.steps):
        batch = collate([dataset[(step * 8 + i) % len(dataset)] for i in range(8)])
        for name, (model, optimizer, config) in models.items():
            torch.manual_seed(step)
            cpu, wall = time.process_time(), time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses = model(*batch)
            sum(losses.values()).backward()
            optimizer.step()
            if step >= WARMUP_STEPS:
                timings[name][0].append(time.process_time() - cpu)
                timings[name][1].append(time.perf_counter() - wall)
    base_cpu = statistics.median(timings["shapes-cpu"][0])
    for name, (cpu, wall) in timings.items():
        params = sum(p.numel() for p in models[name][0].parameters())
        print(f"{name:<22} {params:>9,} parameters  CPU {1000 * statistics.median(cpu):7.1f} ms/step  "
              f"wall {1000 * statistics.median(wall):7.1f} ms/step  ({statistics.median(cpu) / base_cpu:.2f}x CPU)")


if __name__ == "__main__":
    main()
