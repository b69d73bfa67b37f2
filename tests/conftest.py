"""Shared fixtures: a tiny shapes set generated once per test session."""

from __future__ import annotations

import pytest
import torch

TINY_SHAPES = {"num_train": 16, "num_val": 8, "image_size": 128, "seed": 0}


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """Root Path of a shapes set with 16 train / 8 val images at 128x128 (val image 2 holds a crowd).

    Layout: root/images/{train,val}_NNNNNN.png, root/annotations/instances_{train,val}.json,
    root/annotations/panoptic_{train,val}.json, root/panoptic/{train,val}/*.png.
    Treat it as read-only: it is shared by every test of the session.
    """
    from minimrcnn.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("tiny") / "shapes", **TINY_SHAPES)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, then restore the setting. Batches of a few 128 x 128
    images are too small for OpenMP to pay off; with two threads such tests ran 2.5x slower
    on a shared 2-core machine (synchronisation and spinning)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
