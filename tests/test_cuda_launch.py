"""The CUDA launch path without a GPU: a DeviceArgument (ops/_numba.py) must give numba's kernel
launch exactly the argument words a DeviceNDArray of the same memory gives it."""

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from numba.cuda import dispatcher
from numba.cuda.cudadrv import devicearray, driver

from minimrcnn.ops._numba import DeviceArgument, c_array

POINTER = 0x7F00_0000_1000  # where the fake device memory starts


class _FakeDeviceMemory:
    """What DeviceNDArray asks of its gpu_data: a pointer and a size (no driver call)."""

    __cuda_memory__ = True

    def __init__(self, size_bytes, nvidia_binding):
        self._cuda_memsize_ = size_bytes
        self.device_ctypes_pointer = POINTER if nvidia_binding else ctypes.c_void_p(POINTER)


def _launch_words(numba_type, value):
    """The ctypes words numba's launch passes for one argument, as plain numbers."""
    words = []
    dispatcher._Kernel._prepare_args(SimpleNamespace(extensions=[]), numba_type, value, 0, [], words)
    return [word.value for word in words]


class _AtPointer(DeviceArgument):
    """A DeviceArgument of a CPU tensor, moved to the fake pointer (the layout is what counts)."""

    __slots__ = ()

    def __init__(self, tensor, nvidia_binding):
        super().__init__(tensor, nvidia_binding)
        self.device_ctypes_pointer = POINTER if nvidia_binding else ctypes.c_void_p(POINTER)


@pytest.mark.parametrize("nvidia_binding", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4, 5)])
def test_device_argument_gives_the_launch_the_words_of_a_device_array(monkeypatch, nvidia_binding, dtype, shape):
    monkeypatch.setattr(driver, "USE_NV_BINDING", nvidia_binding)
    tensor = torch.zeros(shape, dtype=dtype)
    numpy_dtype = tensor.numpy().dtype
    reference = devicearray.DeviceNDArray(shape, tensor.numpy().strides, numpy_dtype,
                                          gpu_data=_FakeDeviceMemory(tensor.numel() * tensor.element_size(),
                                                                     nvidia_binding))
    numba_type = c_array(numpy_dtype, len(shape))
    ours = _launch_words(numba_type, _AtPointer(tensor, nvidia_binding))
    assert ours == _launch_words(numba_type, reference)
    # meminfo, parent, nitems, itemsize, data, shape..., byte strides...
    assert ours[2:5] == [tensor.numel(), tensor.element_size(), POINTER]


def test_device_argument_reads_the_tensor_itself():
    tensor = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(1, 2)  # not contiguous
    argument = DeviceArgument(tensor, nvidia_binding=False)
    assert driver.is_device_memory(argument)
    assert argument.device_ctypes_pointer.value == tensor.data_ptr()
    assert DeviceArgument(tensor, nvidia_binding=True).device_ctypes_pointer == tensor.data_ptr()
    assert (argument.size, argument.ndim, argument.shape) == (24, 3, (2, 4, 3))
    assert argument.strides == tuple(4 * step for step in tensor.stride()) == (48, 4, 16)
    assert argument.dtype == np.float32
    assert argument.tensor is tensor  # keeps the memory alive until the launch is enqueued


def test_every_kernel_dtype_maps_to_numpy():
    for dtype in (torch.float32, torch.float64, torch.int64, torch.int32):
        assert DeviceArgument(torch.zeros(1, dtype=dtype), False).dtype == torch.zeros(1, dtype=dtype).numpy().dtype
