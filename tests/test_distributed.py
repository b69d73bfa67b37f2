"""Distributed training: the sharded, resumable batch sampler, seed mixing, and 2 gloo processes vs 1."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.data import CocoInstances
from minimrcnn.engine.checkpoint import build_model, load_checkpoint
from minimrcnn.engine.distributed import InfiniteBatchSampler, mix_seed, shard_indices
from minimrcnn.engine.train import train


def take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = InfiniteBatchSampler(10, batch_size=5, seed=0)
    batches = take(sampler, 4)  # two epochs
    indices = [index for batch in batches for index, _ in batch]
    assert sorted(indices[:10]) == list(range(10)) == sorted(indices[10:])
    assert indices[:10] != indices[10:]
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # every stream position has its own augmentation seed


def test_batches_straddle_epoch_boundaries():
    sampler = InfiniteBatchSampler(5, batch_size=3, seed=1)
    indices = [index for batch in take(sampler, 5) for index, _ in batch]  # 15 = three epochs
    for epoch in range(3):
        assert sorted(indices[5 * epoch: 5 * epoch + 5]) == list(range(5))


def test_ranks_and_accumulation_split_the_same_global_batch():
    one = take(InfiniteBatchSampler(13, batch_size=8, seed=3), 5)
    accumulated = take(InfiniteBatchSampler(13, batch_size=8, seed=3, accum_steps=2), 10)
    rank_batches = [take(InfiniteBatchSampler(13, batch_size=8, seed=3, rank=r, world_size=2), 5)
                    for r in range(2)]
    for iteration in range(5):
        assert accumulated[2 * iteration] + accumulated[2 * iteration + 1] == one[iteration]
        assert rank_batches[0][iteration] + rank_batches[1][iteration] == one[iteration]
        assert len(rank_batches[0][iteration]) == 4


def test_start_iteration_continues_the_stream():
    whole = take(InfiniteBatchSampler(7, batch_size=4, seed=5, accum_steps=2), 12)
    resumed = take(InfiniteBatchSampler(7, batch_size=4, seed=5, accum_steps=2, start_iteration=3), 6)
    assert resumed == whole[6:]


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteBatchSampler(10, batch_size=6, seed=0, world_size=4)
    with pytest.raises(ValueError, match="dataset_size"):
        InfiniteBatchSampler(0, batch_size=2, seed=0)


def test_mix_seed_is_deterministic_and_spreads():
    # The same in every process (Python's str hash is salted per process: it must not be used).
    code = "from minimrcnn.engine.distributed import mix_seed; print(mix_seed(0, 1, 2), mix_seed(7, 3))"
    printed = set()
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed})
        printed.add(tuple(done.stdout.split()[-2:]))
    assert printed == {(str(mix_seed(0, 1, 2)), str(mix_seed(7, 3)))}
    assert mix_seed(0, 1, 2) != mix_seed(0, 2, 1)  # the order of the parts counts
    seeds = {mix_seed(0, iteration, micro) for iteration in range(100) for micro in range(4)}
    assert len(seeds) == 400
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_shard_indices_cover_everything_once():
    shards = [shard_indices(11, rank, 3) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


# ---------------------------------------------------------------- 2 processes against 1

TINY_OVERRIDES = {
    "base": "shapes-cpu", "min_size": [64], "min_size_test": 64, "max_size": 64,
    "backbone_width": 8, "fpn_channels": 16, "box_head_dim": 32, "mask_head_dim": 8,
    "mask_head_num_convs": 1, "roi_batch_size_per_image": 16, "rpn_batch_size_per_image": 32,
    "rpn_pre_nms_topk_train": 100, "rpn_post_nms_topk_train": 20, "rpn_pre_nms_topk_test": 50,
    "rpn_post_nms_topk_test": 10, "detections_per_image": 10,
    # GroupNorm normalizes each image on its own. With "bn" every process (and every
    # accumulation step) would still normalize its own 2 images, so the weights would
    # agree too, but DDP copies rank 0's running statistics to rank 1 at each forward
    # while one process would update them from both halves: the buffers would differ.
    "norm": "gn",
    "batch_size": 4, "warmup_iters": 1, "base_lr": 0.02, "grad_clip": 10.0, "max_iter": 3,
}


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_shapes):
    """torchrun, 2 CPU processes x 2 images, against 1 process x 2 accumulation steps x 2 images.

    Both see the same 4 images per iteration, split the same way, with the same random
    draws (seeded per micro-batch). The losses are normalized per micro-batch (the mask
    loss by the positives of those images), so the exact 1-process counterpart of DDP's
    gradient average is accumulation, each half weighted 1/2, not one batch of 4.
    What is left is float32 summation order inside the all-reduce.
    """
    config_file = tmp_path / "ddp.json"
    config_file.write_text(json.dumps(TINY_OVERRIDES))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "minimrcnn", "train", "--config", str(config_file), "--out", str(tmp_path / "ddp"),
               "--data", str(tiny_shapes), "--device", "cpu", "--no-eval"]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    single = get_config(str(config_file))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(dataclasses.replace(single, grad_accum_steps=2), tmp_path / "single", data_root=tiny_shapes,
              evaluate=False, progress=False)
    finally:
        torch.set_num_threads(threads)

    two = load_checkpoint(tmp_path / "ddp" / "model_final.pth")["model"]
    one = load_checkpoint(tmp_path / "single" / "model_final.pth")["model"]
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    # Not vacuous: three iterations moved most weights away from their seeded initial values.
    torch.manual_seed(single.seed)
    initial = build_model(single).state_dict()
    moved = [name for name in one if one[name].is_floating_point() and not torch.equal(initial[name], one[name])]
    assert len(moved) > len(one) // 2


def test_two_processes_agree_on_a_time_budget(tmp_path, tiny_shapes):
    """Each process measures its own speed and clock; the plan must still be the same on both,
    or one would wait forever in an all-reduce the other never joins (gloo reports a mismatch)."""
    config_file = tmp_path / "budget.json"
    config_file.write_text(json.dumps({**TINY_OVERRIDES, "max_iter": 1000, "warmup_iters": 10}))
    # The probe runs `python -m minimrcnn` and records what each process evaluates.
    probe = Path(__file__).with_name("distributed_eval_probe.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(probe), "train", "--config", str(config_file), "--out", str(tmp_path / "run"),
               "--data", str(tiny_shapes), "--device", "cpu", "--time-budget", "0.3"]
    finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(tmp_path)},
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "run" / "last.pth")
    assert saved["iteration"] == saved["max_iter"] < 1000
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == saved["max_iter"]
    assert set(summary["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    # Evaluated on both shards: together they hold every val image exactly once, and rank 0
    # gathered both processes' results, each rank's own in rank order.
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    val_ids = CocoInstances(tiny_shapes / "images", tiny_shapes / "annotations/instances_val.json").image_ids
    assert ranks[0]["size"] == ranks[1]["size"] == len(val_ids) == 8
    assert sorted(ranks[0]["shard"] + ranks[1]["shard"]) == list(range(len(val_ids)))
    for part in ranks:
        assert set(part["own"]) <= {val_ids[i] for i in part["shard"]}
        assert part["gathered"] == [ranks[0]["own"], ranks[1]["own"]]
    assert ranks[0]["own"] and ranks[1]["own"]  # both shards' detections reach the evaluation
