"""Count the aten ops of a training step and the ones that would stop the host on CUDA.

On a GPU the training step of a detector is bound by the host long before arithmetic:
each aten op costs a few microseconds of Python and launch time, and each op whose
output *shape* or *value* the host must know waits for the device to finish everything
queued before it (a host-device synchronization). Both are visible on the CPU, which
makes them a proxy that tests can hold without a GPU:

- ``total``: every aten op dispatched during forward + backward;
- ``syncs``: the ops in ``SYNC_OPS`` below, plus host reads of tensor data.

What counts as sync-forcing (each would block the host on a CUDA tensor):

1. Data-dependent output shapes (the host needs the size to allocate the output):
   ``nonzero`` (also ``torch.where(cond)`` and ``as_tuple=True``), boolean-mask
   indexing and assignment (``index.Tensor`` / ``index_put`` with a bool index, which
   run ``nonzero`` inside), ``masked_select``, ``masked_scatter``, ``unique`` in all
   its variants, ``repeat_interleave`` without ``output_size``.
2. Values read on the host: ``_local_scalar_dense`` (``.item()``, ``int(t)``,
   ``float(t)``, ``bool(t)``, ``if t:``), ``equal``.
3. Host copies seen at the Python level (``TorchFunctionMode``): ``Tensor.tolist``,
   ``Tensor.numpy`` and ``Tensor.cpu`` (``.cpu().numpy()`` counts once); and
   ``torch.tensor`` / ``torch.as_tensor`` / ``Tensor.new_tensor`` of Python data,
   which on CUDA is a copy from pageable host memory (the stream is synchronized
   first).

Not counted: anything inside the code that runs on CPU tensors only and that a CUDA
step does not run (``EXEMPT_FUNCTIONS``): the CPU kernels of the RoI ops (NumPy views of
host memory; the CUDA backend replaces them), the CPU branch of the RoI value checks
(skipped on CUDA unless ``ops._validate.DEBUG_CHECKS``), and ``check_losses_finite``
(which returns at once for device losses); and ``modeling.batched.host_to_device``,
which copies from pinned memory without a sync on CUDA.

Not visible on the CPU: copies of CPU-made tensors with ``.to(device)`` (a no-op there)
and syncs inside a kernel library (cuDNN autotuning). Counts are therefore a lower
bound for what ``torch.cuda.set_sync_debug_mode`` reports; bench/gpu_check.py measures
the real ones on a GPU.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten overload packets whose every call syncs on CUDA.
SYNC_OPS = {
    "nonzero": aten.nonzero,
    "masked_select": aten.masked_select,
    "masked_scatter": aten.masked_scatter,
    "masked_scatter_": aten.masked_scatter_,
    "_unique": aten._unique,
    "_unique2": aten._unique2,
    "unique_dim": aten.unique_dim,
    "unique_consecutive": aten.unique_consecutive,
    "_local_scalar_dense": aten._local_scalar_dense,
    "equal": aten.equal,
}
# Ops that sync only with a boolean index (a mask becomes indices through nonzero).
BOOL_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# repeat_interleave syncs unless the output size is given.
REPEAT_INTERLEAVE = aten.repeat_interleave
# Host copies at the Python level (method name -> counted name).
HOST_READ_METHODS = {"tolist", "numpy", "cpu"}
HOST_WRITE_FUNCTIONS = {"tensor", "as_tensor", "new_tensor"}
# Functions of the package that run on CPU tensors only (see the module docstring).
EXEMPT_FILES = ("minimrcnn/ops/_numba.py",)
EXEMPT_FUNCTIONS = {"_numba_forward", "_numba_backward", "_reference_forward", "_reference_backward",
                    "_roi_values_ok_cpu", "check_losses_finite", "host_to_device"}


@dataclasses.dataclass
class StepOpCounts:
    total: int
    syncs: int
    by_op: collections.Counter
    sync_by_op: collections.Counter
    sync_sites: collections.Counter


def _package_site() -> str:
    """file:line of the innermost frame in the minimrcnn package (or '?')."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        if "/minimrcnn/" in filename and not filename.endswith("engine/step_ops.py"):
            return f"{filename.split('/minimrcnn/')[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _exempt() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith(EXEMPT_FILES):
            return True
        if "/minimrcnn/" in filename and frame.f_code.co_name in EXEMPT_FUNCTIONS:
            return True
        frame = frame.f_back
    return False


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


class _Counter:
    def __init__(self, with_sites: bool):
        self.by_op = collections.Counter()
        self.sync_by_op = collections.Counter()
        self.sync_sites = collections.Counter()
        self.with_sites = with_sites

    def sync(self, name: str) -> None:
        self.sync_by_op[name] += 1
        if self.with_sites:
            self.sync_sites[f"{_package_site()} {name}"] += 1


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        self.counter.by_op[packet.__name__] += 1
        if packet in SYNC_OPS.values():
            if not _exempt():
                self.counter.sync(packet.__name__)
        elif packet in BOOL_INDEX_OPS and _has_bool_index(args):
            self.counter.sync(f"{packet.__name__}(bool mask)")
        elif packet is REPEAT_INTERLEAVE and kwargs.get("output_size") is None and func._overloadname in ("Tensor", "self_Tensor"):
            self.counter.sync("repeat_interleave(no output_size)")
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counter: _Counter):
        super().__init__()
        self.counter = counter
        self.cpu_results: dict[int, weakref.ref] = {}  # id -> the .cpu() results seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        if name in HOST_READ_METHODS and args and isinstance(args[0], torch.Tensor) and not _exempt():
            seen = self.cpu_results.get(id(args[0]))
            if not (name == "numpy" and seen is not None and seen() is args[0]):
                self.counter.sync(f"Tensor.{name}")
            if name == "cpu" and isinstance(result, torch.Tensor):
                self.cpu_results[id(result)] = weakref.ref(result)
        elif name in HOST_WRITE_FUNCTIONS and not _exempt():
            data = args[1] if name == "new_tensor" and len(args) > 1 else (args[0] if args else None)
            if not isinstance(data, torch.Tensor):
                self.counter.sync(f"torch.{name}(host data)")
        return result


def fill_anchor_cache(model: torch.nn.Module, images) -> None:
    """Build the anchors of this batch's feature shapes, as the first training step does.

    The anchor generator caches its anchors per feature shape, so a steady-state step
    never builds them; counting a step after this measures that steady state.
    """
    batch = model.preprocess(images)
    height, width = batch.tensor.shape[-2:]
    levels = model.config.fpn_levels
    shapes = [torch.empty((1, 1, -(-height // 2**level), -(-width // 2**level)), device=batch.tensor.device)
              for level in levels]
    model.rpn.anchor_generator(shapes)


def count_step_ops(model: torch.nn.Module, images, targets, with_sites: bool = True) -> StepOpCounts:
    """Run ``model(images, targets)`` and backward of the summed losses; count the ops.

    The model must be in training mode. The gradients it leaves are the caller's.
    """
    fill_anchor_cache(model, images)
    counter = _Counter(with_sites)
    with _FunctionCounter(counter), _DispatchCounter(counter):
        losses = model(images, targets)
        sum(losses.values()).backward()
    return StepOpCounts(
        total=sum(counter.by_op.values()),
        syncs=sum(counter.sync_by_op.values()),
        by_op=counter.by_op,
        sync_by_op=counter.sync_by_op,
        sync_sites=counter.sync_sites,
    )


__all__ = ["SYNC_OPS", "StepOpCounts", "count_step_ops", "fill_anchor_cache"]
