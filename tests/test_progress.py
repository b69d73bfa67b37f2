"""Progress output: tqdm on a terminal, a plain line every few seconds in a log."""

import io

import pytest

from minimrcnn.engine import checkpoint as ckpt
from minimrcnn.engine.progress import Progress
from minimrcnn.engine import train as train_module
from test_train import StandInModel, tiny_config


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_gets_a_line_every_few_seconds_with_losses_and_speed():
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(100, desc="train", stream=stream, min_seconds=10.0, clock=clock)
    assert progress.bar is None  # StringIO is not a terminal
    for step in range(100):
        clock.now += 0.5  # 2 it/s
        if step % 20 == 0:
            progress.set_losses({"loss_classifier": 0.5, "loss_mask": 0.25})
        progress.update(1)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5  # 50 s at one line per 10 s, the last one at the end
    assert lines[0] == "train 20/100 (20%) 2.00 it/s loss 0.750 classifier 0.500 mask 0.250"
    assert lines[-1].startswith("train 100/100 (100%)")


def test_terminal_gets_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(10, desc="train", stream=stream)
    assert progress.bar is not None
    for _ in range(10):
        progress.update(1)
    progress.close()
    assert "\r" in stream.getvalue()  # redrawn in place


def test_disabled_prints_nothing():
    stream = io.StringIO()
    progress = Progress(10, stream=stream, enabled=False, min_seconds=0.0)
    progress.update(10)
    progress.close()
    assert stream.getvalue() == ""


@pytest.mark.usefixtures("one_thread")
def test_training_into_a_log_writes_few_lines(tmp_path, tiny_shapes, monkeypatch, capsys):
    """The reported case: a non-interactive log used to get one tqdm line per iteration."""
    monkeypatch.setattr(ckpt, "build_model", StandInModel)
    train_module.train(tiny_config(max_iter=30, batch_size=2), tmp_path / "run", data_root=tiny_shapes,
                       evaluate=False, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train")]
    assert 1 <= len(lines) < 10
    assert lines[-1].startswith("train 30/30 (100%)") and "it/s loss" in lines[-1]
