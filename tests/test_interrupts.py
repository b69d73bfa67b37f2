"""Ctrl-C and SIGTERM during training: a checkpoint at the current iteration, one line, exact resume.

Each signal is sent to a real ``python -m minimrcnn train``-like subprocess (the CLI's
``main`` with the fast stand-in model of test_train.py) once it has run a few iterations.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minimrcnn.engine import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MAX_ITER = 40
STARTED_AFTER = 5  # forward calls before the child says it is running

CHILD = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from minimrcnn.cli import main
    from minimrcnn.engine import checkpoint as ckpt
    from test_train import StandInModel

    torch.set_num_threads(1)
    marker, calls = {marker!r}, [0]

    class Slow(StandInModel):
        def forward(self, images, targets):
            calls[0] += 1
            if calls[0] == {started}:
                open(marker, "w").close()
            if {slow}:
                time.sleep(0.1)  # leaves time for the signal to land mid-run
            return super().forward(images, targets)

    ckpt.build_model = Slow
    sys.exit(main(sys.argv[1:]))
""")


def child_command(tmp_path, run_dir, shapes, config_file, slow=True, resume=False):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS), marker=str(tmp_path / "started"), started=STARTED_AFTER,
                                   slow=slow))
    args = [sys.executable, str(script), "train", "--out", str(run_dir), "--data", str(shapes),
            "--no-eval", "--device", "cpu"]
    return args + (["--resume"] if resume else ["--config", str(config_file)])


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "standin.json"
    path.write_text(f'{{"base": "shapes-cpu", "max_iter": {MAX_ITER}, "batch_size": 2, "num_workers": 0, '
                    f'"checkpoint_period": 100000, "warmup_iters": 2}}')
    return path


def environment():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_is_exact(tmp_path, tiny_shapes, config_file, signal_number):
    run_dir = tmp_path / "run"
    child = subprocess.Popen(child_command(tmp_path, run_dir, tiny_shapes, config_file), env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "started").exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never started training"
        time.sleep(0.05)
    child.send_signal(signal_number)
    stdout, stderr = child.communicate(timeout=300)

    assert child.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    saved = ckpt.load_checkpoint(run_dir / "last.pth")
    iteration = saved["iteration"]
    assert STARTED_AFTER - 1 <= iteration < MAX_ITER  # the iteration it was in, not a periodic one
    assert last_line == f"interrupted at iteration {iteration}; continue with --resume"

    # Resuming (fast now) ends with the weights of a run never interrupted.
    resumed = subprocess.run(child_command(tmp_path, run_dir, tiny_shapes, config_file, slow=False, resume=True),
                             env=environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(child_command(tmp_path, tmp_path / "straight", tiny_shapes, config_file, slow=False),
                              env=environment(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a = ckpt.load_checkpoint(run_dir / "model_final.pth")["model"]
    b = ckpt.load_checkpoint(tmp_path / "straight" / "model_final.pth")["model"]
    assert ckpt.load_checkpoint(run_dir / "last.pth")["iteration"] == MAX_ITER
    assert all(torch.equal(a[name], b[name]) for name in b)
