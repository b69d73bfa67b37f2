"""Numba set-up; imported by the kernel modules before any kernel is compiled. It also
holds the few pieces the kernel modules share: LazyKernel, cuda_launch, unravel_cell, image_order.

Three defaults of Numba get in the way of ordinary use of this package, so we change them,
unless the user chose otherwise through Numba's own environment variables:

1. Threading layer. Numba's default picks OpenMP when it can. A process that ran
   a GNU-OpenMP parallel region and then fork()s (what a DataLoader with
   num_workers > 0 does) gets its children killed as soon as they run a parallel
   kernel: "Terminating: fork() called from a process already using GNU
   OpenMP, this is unsafe." The 'workqueue' layer has no such problem and is
   always available. (It does not support launching parallel kernels from
   several Python threads at once: Numba aborts if that happens.)
2. Cache directory. cache=True writes compiled kernels next to the source, in
   the package's __pycache__. In a read-only install (a system site-packages, a
   container image) Numba falls back to ~/.cache, and if that is not writable
   either, importing a module with cache=True kernels raises. We point the
   cache at a writable per-user directory when the package directory is not
   writable.
3. CUDA low-occupancy warnings. A launch for a few RoIs (mask targets of one image,
   say) is small by nature; Numba would warn on each one. Turned off.

All are set in os.environ (so that numba.config.reload_config(), which the
compiler calls and which re-reads every NUMBA_* variable whenever one changed,
keeps them) and in numba.config for a numba that is already imported.
"""

import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np

THREADING_LAYER = "workqueue"
PACKAGE_PYCACHE = Path(__file__).resolve().parent / "__pycache__"
USER_CACHE_DIR = Path.home() / ".cache" / "minimrcnn" / "numba"


def is_writable_dir(path):
    """True if `path` exists or can be created, and a file can be written in it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def choose_cache_dir(package_pycache=PACKAGE_PYCACHE, user_cache_dir=USER_CACHE_DIR):
    """None when Numba's own choice works (writable package __pycache__); else a writable dir."""
    if is_writable_dir(package_pycache):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    for candidate in (Path(user_cache_dir), Path(tempfile.gettempdir()) / f"minimrcnn-numba-{uid}"):
        if is_writable_dir(candidate):
            return str(candidate)
    return None  # nothing writable: leave numba's behaviour (and its error message) as is


def configure():
    """Apply the three settings; returns the environment variables it set."""
    chosen = {}
    if "NUMBA_THREADING_LAYER" not in os.environ:
        chosen["NUMBA_THREADING_LAYER"] = THREADING_LAYER
    if "NUMBA_CACHE_DIR" not in os.environ:
        cache_dir = choose_cache_dir()
        if cache_dir is not None:
            chosen["NUMBA_CACHE_DIR"] = cache_dir
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
        chosen["NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS"] = "0"
    os.environ.update(chosen)

    import numba  # after os.environ: a first import reads the variables itself

    if "NUMBA_THREADING_LAYER" in chosen:
        numba.config.THREADING_LAYER = THREADING_LAYER
    if "NUMBA_CACHE_DIR" in chosen:
        numba.config.CACHE_DIR = chosen["NUMBA_CACHE_DIR"]
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" in chosen:
        numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    return chosen


CONFIGURED = configure()

import numba  # noqa: E402  (after configure(): the first import reads the variables)
from numba import cuda  # noqa: E402

CUDA_THREADS_PER_BLOCK = 256
CUDA_MAX_BLOCKS = 65535  # the kernels loop over the grid (grid-stride), so any size fits


class LazyKernel:
    """A numba.cuda kernel compiled for one signature, once, on its first launch.

    ``cuda.jit(signature)`` compiles eagerly and gives a *specialized* dispatcher: a launch
    goes straight to the one compiled kernel, without typing its arguments again (with a
    plain ``cuda.jit`` every launch types every argument to look its overload up). Eager
    compilation needs a CUDA device to compile for, so it waits for the first launch
    instead of import time: the package imports on machines without a GPU. Under the
    simulator ``cuda.jit(signature)`` ignores the signature and runs the Python function.

    py_func: the kernel's Python function; signature: a numba signature (``void(...)``)
    whose array arguments are C-contiguous, which ``cuda_launch`` guarantees.
    """

    def __init__(self, py_func, signature):
        self.py_func = py_func
        self.signature = signature
        self._dispatcher = None

    @property
    def dispatcher(self):
        if self._dispatcher is None:
            self._dispatcher = cuda.jit(self.signature)(self.py_func)
        return self._dispatcher

    def __repr__(self):
        return f"LazyKernel({self.py_func.__name__}, {self.signature})"


def lazy_kernels_per_float_type(kernels_in, signature_in):
    """{torch.float32: (forward, backward), torch.float64: ...} LazyKernels of an op whose
    ``kernels_in(real)`` builds the (forward, backward) Python kernels in float type `real` and
    ``signature_in(real)`` their (forward, backward) signatures."""
    import torch

    kernels = {}
    for dtype, real in ((torch.float32, np.float32), (torch.float64, np.float64)):
        forward, backward = kernels_in(real)
        forward_signature, backward_signature = signature_in(real)
        kernels[dtype] = (LazyKernel(forward, forward_signature), LazyKernel(backward, backward_signature))
    return kernels


def c_array(dtype, ndim):
    """The numba type of a C-contiguous array (what ``cuda_launch`` hands a kernel)."""
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C")


# numba Stream objects for torch's streams, keyed by (device index, stream handle): one
# wrapper per stream for the life of the process instead of a new one per launch.
_EXTERNAL_STREAMS = {}


def numba_stream_of(torch_stream, device_index):
    """The numba wrapper of a torch CUDA stream (cached by its handle)."""
    key = (device_index, torch_stream.cuda_stream)
    stream = _EXTERNAL_STREAMS.get(key)
    if stream is None:
        stream = _EXTERNAL_STREAMS[key] = cuda.external_stream(torch_stream.cuda_stream)
    return stream


class DeviceArgument:
    """A CUDA tensor as the argument of a numba kernel launch, without a DeviceNDArray.

    ``cuda.as_cuda_array`` builds a DeviceNDArray per tensor per launch: torch writes out its
    ``__cuda_array_interface__`` dict, numba asks the driver about the pointer, wraps it in a
    MemoryPointer and an external stream. A compiled (specialized) kernel reads only this of
    an array argument: that it is device memory (``__cuda_memory__``), its pointer, size,
    dtype, ndim, shape and byte strides. So we hand it just that, read from the tensor.
    tensor: a CUDA tensor (kept here, alive until the launch has been enqueued).
    """

    __cuda_memory__ = True
    __slots__ = ("tensor", "device_ctypes_pointer", "size", "dtype", "ndim", "shape", "strides")

    def __init__(self, tensor, nvidia_binding):
        self.tensor = tensor
        pointer = tensor.data_ptr()
        # numba's launch takes int(pointer) with NVIDIA's bindings, pointer.value with its own ctypes ones
        self.device_ctypes_pointer = pointer if nvidia_binding else ctypes.c_void_p(pointer)
        self.size = tensor.numel()
        self.dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
        self.ndim = tensor.dim()
        self.shape = tuple(tensor.shape)
        self.strides = tuple(step * tensor.element_size() for step in tensor.stride())


def cuda_launch(kernel, num_threads, inputs, scalars, outputs, device):
    """Run kernel(*inputs, *scalars, *outputs) over `num_threads` cells.

    kernel: a LazyKernel (or a plain ``cuda.jit`` dispatcher). CUDA tensors are handed over
    without host copies, as DeviceArguments to a LazyKernel (through __cuda_array_interface__ to
    a plain dispatcher); a non-contiguous input gets one contiguous copy on the device, outputs
    must be contiguous; and the kernel runs on
    torch's current stream, so it is ordered with torch's own work. Under the CUDA simulator
    (CPU tensors) they go as NumPy views.
    """
    # a small launch gets a small block: the simulator runs every thread, even idle ones
    threads_per_block = CUDA_THREADS_PER_BLOCK if num_threads > CUDA_THREADS_PER_BLOCK else num_threads
    blocks = -(-num_threads // threads_per_block)
    blocks = 1 if blocks < 1 else (CUDA_MAX_BLOCKS if blocks > CUDA_MAX_BLOCKS else blocks)
    # contiguous inputs: a LazyKernel is compiled for C-contiguous arrays (and on a GPU the
    # threads of a warp then read neighbouring addresses); a no-op when already contiguous
    tensors = tuple(t.contiguous() for t in inputs) + tuple(outputs)
    for t in outputs:
        if not t.is_contiguous():
            raise ValueError("cuda_launch: outputs must be contiguous (the kernels index them as C arrays)")
    dispatcher = kernel.dispatcher if isinstance(kernel, LazyKernel) else kernel
    if device.type == "cuda":
        import torch

        from numba.cuda.cudadrv import driver

        if getattr(dispatcher, "specialized", False):  # compiled for one signature: no typing of arguments
            arrays = [DeviceArgument(t, driver.USE_NV_BINDING) for t in tensors]
        else:  # a dispatcher that types its arguments needs real DeviceNDArrays (sync=False: same stream)
            arrays = [cuda.as_cuda_array(t, sync=False) for t in tensors]
        stream = numba_stream_of(torch.cuda.current_stream(device), device.index)
        if device.index == torch.cuda.current_device():
            # numba launches in the thread's current CUDA context, which is torch's current
            # device's primary context: no context switch needed
            dispatcher[blocks, threads_per_block, stream](*arrays[: len(inputs)], *scalars, *arrays[len(inputs):])
        else:
            with cuda.gpus[device.index]:
                dispatcher[blocks, threads_per_block, stream](*arrays[: len(inputs)], *scalars,
                                                              *arrays[len(inputs):])
    else:
        arrays = [t.numpy() for t in tensors]
        dispatcher[blocks, threads_per_block](*arrays[: len(inputs)], *scalars, *arrays[len(inputs):])


@cuda.jit(device=True)
def unravel_cell(index, channels, pooled_h, pooled_w):
    """Flat index of an output cell of [K, C, ph, pw] -> (k, c, py, px); one thread per cell."""
    px = index % pooled_w
    py = (index // pooled_w) % pooled_h
    c = (index // (pooled_w * pooled_h)) % channels
    k = index // (pooled_w * pooled_h * channels)
    return k, c, py, px


def image_order(rois64, num_images):
    """RoI indices grouped by image (stable) and the offsets of each image's group.

    rois64: [K, 5] float64 -> (rois_by_image [K] int64, image_offsets [N + 1] int64): the RoIs
    of image n are rois_by_image[image_offsets[n]:image_offsets[n + 1]].
    """
    batch_index = rois64[:, 0].astype(np.int64)
    rois_by_image = np.argsort(batch_index, kind="stable")
    image_offsets = np.searchsorted(batch_index[rois_by_image], np.arange(num_images + 1))
    return rois_by_image, image_offsets.astype(np.int64)
