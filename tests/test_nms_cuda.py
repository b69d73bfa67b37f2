"""Device NMS (ops/nms_cuda.py, the 64-box bitmask kernel) under Numba's CUDA simulator, against the
CPU NMS and the brute-force spec of tests/test_boxes.py; and the kernel compiled to PTX."""

import numpy as np
import pytest
import torch

from minimrcnn.ops import boxes as boxes_module
from minimrcnn.ops.boxes import batched_nms

from cuda_simulator_cases import run_under_simulator
from test_boxes import nms_loop


@pytest.fixture(scope="module")
def recorded():
    return run_under_simulator()["nms"]


def test_device_nms_matches_cpu_and_brute_force(recorded):
    assert len(recorded["cases"]) == 8
    for case, kept in zip(recorded["cases"], recorded["kept"]):
        expected = nms_loop(case["boxes"], case["scores"].numpy(), case["classes"].numpy(), case["threshold"])
        assert kept.tolist() == expected[: case["max_kept"]]
        cpu = batched_nms(case["boxes"], case["scores"], case["classes"], case["threshold"], case["max_kept"])
        assert kept.tolist() == cpu.tolist()


def test_device_nms_one_row_per_class_matches_the_cpu(recorded):
    for case, kept in zip(recorded["cases"], recorded["kept_by_class"]):
        cpu = batched_nms(case["boxes"], case["scores"], case["classes"], case["threshold"], case["max_kept"])
        assert kept.tolist() == cpu.tolist()


def test_device_nms_hand_cases(recorded):
    kept = [k.tolist() for k in recorded["kept"]]
    assert kept[3] == [0, 64]  # 64 duplicates suppressed down to the first; the 65th is another class
    assert kept[4] == [0, 1]  # IoU exactly at the threshold is not suppressed
    assert kept[5] == [0, 1, 2]  # degenerate boxes never suppress
    assert kept[6] == []
    assert len(kept[7]) == 7 and kept[7] == kept[1][:7]


def test_device_nms_rows(recorded):
    rows = recorded["rows"]
    for row in range(3):
        count = int(rows["counts"][row])
        # the rows are already "sorted" (by position): equal scores, ties in input order
        expected = nms_loop(rows["boxes"][row, :count], np.zeros(count), rows["classes"][row, :count].numpy(),
                            rows["threshold"])[: rows["max_kept"]]
        assert rows["num_kept"][row] == len(expected)
        assert rows["kept"][row, : len(expected)].tolist() == expected
    assert rows["num_kept"].tolist()[1] == 0


def test_cuda_tensors_dispatch_to_the_bitmask_nms(monkeypatch):
    calls = []

    class FakeCuda(torch.Tensor):  # is_cuda without a GPU: only the dispatch is under test
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(boxes_module, "batched_nms_bitmask", lambda *args: calls.append(args) or torch.zeros(0))
    boxes = torch.tensor([[0.0, 0, 1, 1]]).as_subclass(FakeCuda)
    batched_nms(boxes, torch.ones(1), torch.zeros(1, dtype=torch.int64), 0.5)
    assert len(calls) == 1


def test_nms_kernel_compiles_for_a_real_gpu(monkeypatch):
    from numba import cuda
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import nvvm

    from minimrcnn.ops import nms_cuda

    if not nvvm.is_available():
        pytest.skip("no NVVM (libNVVM of a CUDA toolkit) here")
    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _FakeDevice())
    assert set(nms_cuda.SUPPRESSION_KERNELS) == {torch.float32, torch.float64}
    for kernel in nms_cuda.SUPPRESSION_KERNELS.values():  # the eager signatures the launches use
        ptx, _ = cuda.compile_ptx(kernel.py_func, kernel.signature, cc=(9, 0))
        assert ".entry" in ptx


class _FakeDevice:
    compute_capability = (9, 0)
