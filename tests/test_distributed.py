"""Distributed pieces: the sharded, resumable batch sampler and seed mixing (the 2-process test is below)."""

import pytest

from minimrcnn.engine.distributed import InfiniteBatchSampler, mix_seed, shard_indices


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
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    seeds = {mix_seed(0, iteration, micro) for iteration in range(100) for micro in range(4)}
    assert len(seeds) == 400
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_shard_indices_cover_everything_once():
    shards = [shard_indices(11, rank, 3) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
