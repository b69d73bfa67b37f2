"""Count the aten ops of one training step, and the ones that would force a host-device sync on CUDA.

    python bench/step_ops.py                      # shapes-gpu, 16 images of 128 x 128, on the CPU
    python bench/step_ops.py --config shapes-cpu --batch-size 8 --top 30

The GPU path of a detector is bound by Python and by waits for the device long before it
is bound by arithmetic: every aten op is a kernel launch (a few microseconds of host time
each), and every op whose *output shape or value* the host needs stops the host until
the device has caught up. Both are visible on the CPU: this script runs one forward +
backward of a training step under a ``TorchDispatchMode`` and counts

- every aten op dispatched (the launch count), and
- the ops that synchronize on CUDA (``minimrcnn.engine.step_ops.SYNC_OPS``): data-dependent
  output shapes (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ...)
  and reads of device values on the host (``item``/``_local_scalar_dense``, copies to the CPU).

It prints the totals and the most frequent ops of each kind; tests/test_step_op_count.py
holds the totals below the issue-12 targets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import synthetic_batch  # noqa: E402  (bench/model.py: the same synthetic workload)

from minimrcnn import MaskRCNN, get_config  # noqa: E402
from minimrcnn.engine.step_ops import count_step_ops  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes-gpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--instances", type=int, default=6)
    parser.add_argument("--top", type=int, default=20, help="how many of the most frequent ops to list")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = get_config(args.config)
    model = MaskRCNN(config).train()
    generator = torch.Generator().manual_seed(args.seed)
    images, targets = synthetic_batch(args.batch_size, (128, 128), 128, args.instances,
                                      config.num_classes, generator, torch.device("cpu"))
    counts = count_step_ops(model, images, targets)
    print(f"{args.config}, {args.batch_size} images: {counts.total} aten ops, "
          f"{counts.syncs} that sync on CUDA")
    print("\nsync-forcing ops:")
    for name, count in counts.sync_by_op.most_common(args.top):
        print(f"  {count:6d}  {name}")
    print("\nall ops:")
    for name, count in counts.by_op.most_common(args.top):
        print(f"  {count:6d}  {name}")
    if counts.sync_sites:
        print("\nsync-forcing call sites (package frames):")
        for site, count in counts.sync_sites.most_common(args.top):
            print(f"  {count:6d}  {site}")


if __name__ == "__main__":
    main()
