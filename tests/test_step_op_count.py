"""CPU proxies for the GPU training step (issue 12): aten ops and ops that sync on CUDA.

One shapes-gpu training step (forward + backward) of 16 images of 128 x 128, counted with
minimrcnn.engine.step_ops (its docstring defines what counts as a sync). Before the
batched step: 6,092 aten ops (6,172 with this counter) and 420 syncs of the kinds the issue
counted (571 with host copies included). Measured after: 2,351 ops and 10 syncs.
"""

import sys
from pathlib import Path

import pytest
import torch

from minimrcnn import MaskRCNN, get_config
from minimrcnn.engine.step_ops import count_step_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from model import synthetic_batch  # noqa: E402  (bench/model.py's synthetic workload)

MAX_SYNCS = 40
MAX_ATEN_OPS = 2500


@pytest.fixture(scope="module")
def counts():
    torch.manual_seed(0)
    config = get_config("shapes-gpu")
    model = MaskRCNN(config).train()
    images, targets = synthetic_batch(16, (128, 128), 128, 6, config.num_classes,
                                      torch.Generator().manual_seed(0), torch.device("cpu"))
    return count_step_ops(model, images, targets)


def test_shapes_gpu_step_syncs(counts):
    assert counts.syncs <= MAX_SYNCS, counts.sync_sites.most_common()


def test_shapes_gpu_step_aten_ops(counts):
    assert counts.total <= MAX_ATEN_OPS, counts.by_op.most_common(20)
    # The step really ran through the counter: convolutions forward and backward were seen.
    assert counts.by_op["convolution"] > 50 and counts.by_op["convolution_backward"] > 50


class Syncing(torch.nn.Module):
    """A toy 'model' with one sync of each kind the counter must see."""

    def forward(self, images, targets):
        x = images[0].detach()
        weight = images[0]
        mask = x > 0.5
        _ = torch.nonzero(mask)                    # nonzero
        _ = x[mask]                                # boolean indexing
        y = x.clone()
        y[mask] = 0                                # boolean index_put_
        _ = float(x.sum())                         # _local_scalar_dense
        _ = torch.unique(mask)                     # unique
        _ = x.tolist()                             # host read
        _ = x.cpu().numpy()                        # host read, counted once
        _ = torch.repeat_interleave(torch.tensor([1, 2]))  # no output_size (+ a host tensor)
        return {"loss": (weight * 2).sum()}

    def preprocess(self, images):
        raise AssertionError("not called")


def test_counter_sees_every_kind_of_sync(monkeypatch):
    import minimrcnn.engine.step_ops as step_ops

    monkeypatch.setattr(step_ops, "fill_anchor_cache", lambda model, images: None)
    counts = count_step_ops(Syncing(), [torch.rand(3, 4, 4, requires_grad=True)], None)
    kinds = set(counts.sync_by_op)
    assert {"nonzero", "index(bool mask)", "index_put_(bool mask)", "_local_scalar_dense", "_unique2",
            "Tensor.tolist", "Tensor.cpu", "repeat_interleave(no output_size)",
            "torch.tensor(host data)"} <= kinds, kinds
    assert "Tensor.numpy" not in kinds  # .cpu().numpy() is one copy
    assert counts.syncs == 9
