"""``python -m minimrcnn`` under torchrun, recording what each process evaluates.

Run as ``torchrun ... tests/distributed_eval_probe.py train ...`` with PROBE_DIR set: each
process writes PROBE_DIR/rank{r}.json with the val indices of its shard, the image ids of its
own results and the image ids of the gathered results, per rank, in gather order.
"""

import json
import os
import sys
from pathlib import Path

from minimrcnn.cli import main
from minimrcnn.engine import distributed as distrib

probe = {}
shard_indices, all_gather_objects = distrib.shard_indices, distrib.all_gather_objects


def recording_shard_indices(size, rank, world_size):
    indices = shard_indices(size, rank, world_size)
    probe.update(size=size, shard=[int(i) for i in indices])
    return indices


def recording_all_gather_objects(value):
    gathered = all_gather_objects(value)
    probe.update(own=[r["image_id"] for r in value], gathered=[[r["image_id"] for r in part] for part in gathered])
    return gathered


if __name__ == "__main__":
    distrib.shard_indices, distrib.all_gather_objects = recording_shard_indices, recording_all_gather_objects
    code = main(sys.argv[1:])
    Path(os.environ["PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(probe))
    sys.exit(code)
