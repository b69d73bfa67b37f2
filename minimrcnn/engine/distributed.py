"""Several processes: torchrun-aware set-up, DDP wrapping, data sharding, gathering results.

``torchrun --nproc_per_node=G -m minimrcnn train ...`` starts G processes and gives each
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; without them everything
here degrades to a single process (rank 0 of 1) and no process group is created.

Data order is a pure function of ``(seed, iteration)``: :class:`InfiniteBatchSampler`
lays the dataset out as one endless stream of per-epoch permutations, cuts it into
global batches of ``batch_size`` images, and gives each process its own contiguous slice
of every global batch. So G processes see exactly the images that one process sees with
the same global batch, and a resumed run continues at the very next batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# A 64-bit odd constant (the golden ratio's fraction) spreads nearby integers far apart.
_MIX_MULTIPLIER = 0x9E3779B97F4A7C15
_MASK_63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (no Python ``hash``: it is salted per process)."""
    value = 0
    for part in parts:
        value = ((value ^ int(part)) * _MIX_MULTIPLIER + 1) & _MASK_63
        value ^= value >> 29
    return value


@dataclass(frozen=True)
class DistributedInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from exc


def init_distributed(device: torch.device) -> DistributedInfo:
    """Join the process group that torchrun describes (NCCL on CUDA, gloo on CPU), if any."""
    world_size = _env_int("WORLD_SIZE", 1)
    info = DistributedInfo(_env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0))
    if not info.is_distributed or (dist.is_available() and dist.is_initialized()):
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def get_info() -> DistributedInfo:
    """Rank and world size of the current process group (0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistributedInfo()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, device: torch.device,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes, else ``model``.

    ``find_unused_parameters`` costs a graph traversal per step; the model returns every
    loss with a gradient path even when an image has no objects, so it stays off.
    """
    if not get_info().is_distributed:
        return model
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def broadcast_object(value, source: int = 0):
    """``value`` from rank ``source`` on every rank."""
    if not get_info().is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def all_gather_objects(value) -> list:
    """One picklable object per rank, in rank order, on every rank."""
    info = get_info()
    if not info.is_distributed:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_max(*values: float) -> tuple[float, ...]:
    """The maximum of each value over all processes (the values themselves with one process)."""
    if not get_info().is_distributed:
        return values
    # NCCL reduces GPU tensors only; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(tensor.tolist())


def barrier() -> None:
    if get_info().is_distributed:
        dist.barrier()


def shard_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """The items one rank handles in evaluation: every ``world_size``-th, starting at ``rank``."""
    return list(range(rank, num_items, world_size))


class InfiniteBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of ``(dataset_index, sample_seed)`` for one rank.

    Iteration ``i`` uses the global stream positions ``[i * B, (i + 1) * B)`` with ``B`` the
    global batch; position ``p`` is image ``perm_e[p mod n]`` of epoch ``e = p // n``,
    ``perm_e`` a permutation seeded by ``(seed, e)``. Rank ``r`` takes the slice
    ``[r * B / G, (r + 1) * B / G)`` and cuts it into ``accum_steps`` micro-batches.
    Each sample also gets a seed of its own, drawn from ``(seed, p)``, for its random
    augmentation, so augmentations do not depend on workers, ranks or resumption.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, accum_steps: int = 1, start_iteration: int = 0,
                 shuffle: bool = True):
        if dataset_size <= 0:
            raise ValueError("dataset_size: the training set is empty")
        if batch_size % (world_size * accum_steps) != 0:
            raise ValueError(
                f"batch_size: {batch_size} images per iteration do not divide evenly over "
                f"{world_size} processes x {accum_steps} accumulation steps")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.micro_batch_size = batch_size // (world_size * accum_steps)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.start_iteration = start_iteration
        self.shuffle = shuffle
        self._current: tuple[int, list[int]] | None = None  # (epoch, its order): the only one needed again

    def _permutation(self, epoch: int) -> list[int]:
        if self._current is None or self._current[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                order = torch.randperm(self.dataset_size, generator=generator).tolist()
            else:
                order = list(range(self.dataset_size))
            self._current = (epoch, order)
        return self._current[1]

    def micro_batch(self, iteration: int, micro_step: int) -> list[tuple[int, int]]:
        """The ``(dataset_index, sample_seed)`` pairs of one micro-batch of this rank."""
        first = iteration * self.batch_size + \
            (self.rank * self.accum_steps + micro_step) * self.micro_batch_size
        pairs = []
        for position in range(first, first + self.micro_batch_size):
            epoch, offset = divmod(position, self.dataset_size)
            pairs.append((self._permutation(epoch)[offset], mix_seed(self.seed, position, 1)))
        return pairs

    def __iter__(self):
        iteration = self.start_iteration
        while True:
            for micro_step in range(self.accum_steps):
                yield self.micro_batch(iteration, micro_step)
            iteration += 1
