"""minimrcnn.ops._numba: the threading layer survives fork() (DataLoader workers),
and a read-only install still imports (Numba's cache goes to a writable dir).
Each check runs in a subprocess, since both settings are read once per process."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minimrcnn
from minimrcnn.ops import _numba

PACKAGE_DIR = Path(minimrcnn.__file__).resolve().parent

FORK_SCRIPT = textwrap.dedent(
    """
    import numba
    import torch
    from torch.utils.data import DataLoader, Dataset

    from minimrcnn.ops import roi_align

    features = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0, 1, 1, 9, 9], [0, 3, 2, 15, 12]], dtype=torch.float32)
    expected = roi_align(features, rois, 3, backend="numba")  # a parallel kernel runs in the parent
    print("layer", numba.threading_layer(), flush=True)
    print("low-occupancy warnings", numba.config.CUDA_LOW_OCCUPANCY_WARNINGS, flush=True)


    class Crops(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):  # and again in each forked worker
            return roi_align(features, rois, 3, backend="numba")


    crops = list(DataLoader(Crops(), batch_size=None, num_workers=2))
    assert len(crops) == 4 and all(torch.equal(crop, expected) for crop in crops)
    print("workers ok")
    """
)


def run_python(code, env, cwd, timeout=180):
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def env_without_numba_settings(**extra):
    env = {name: value for name, value in os.environ.items() if not name.startswith("NUMBA_")}
    env.update({name: str(value) for name, value in extra.items()})
    return env


def test_dataloader_workers_run_kernels_after_the_parent_did(tmp_path):
    result = run_python(FORK_SCRIPT, env_without_numba_settings(), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layer workqueue" in result.stdout and "workers ok" in result.stdout
    assert "low-occupancy warnings 0" in result.stdout


def test_user_threading_layer_is_respected_and_omp_breaks_forked_workers(tmp_path):
    # The failure that the workqueue default avoids: with GNU OpenMP, forked workers die.
    result = run_python(FORK_SCRIPT, env_without_numba_settings(NUMBA_THREADING_LAYER="omp"), tmp_path)
    if "layer omp" not in result.stdout:
        pytest.skip(f"Numba's OpenMP layer is not available here: {result.stderr[-300:]}")
    assert result.returncode != 0 and "workers ok" not in result.stdout


def read_only_install(tmp_path):
    """A copy of the package where nothing can be written: __pycache__ and ~/.cache are files."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE_DIR, site / "minimrcnn", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "minimrcnn" / "ops" / "__pycache__").write_text("not a directory")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".cache").write_text("not a directory")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = env_without_numba_settings(HOME=home, PYTHONPATH=site, TMPDIR=temp)
    env.pop("XDG_CACHE_HOME", None)
    return site, temp, env


READ_ONLY_SCRIPT = textwrap.dedent(
    """
    import importlib, os
    module = importlib.import_module("minimrcnn.ops.roi_align")
    print("file", module.__file__)
    print("cache", os.environ.get("NUMBA_CACHE_DIR"))
    assert module._interp_cpu(2.25, 5) == (2, 3, 0.75, 0.25)  # compiles, and writes the cache
    """
)


def test_read_only_install_imports_and_caches_in_a_writable_dir(tmp_path):
    site, temp, env = read_only_install(tmp_path)
    result = run_python(READ_ONLY_SCRIPT, env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"file {site}" in result.stdout  # the copy was imported, not the working tree
    cache_dir = temp / f"minimrcnn-numba-{os.getuid()}"
    assert f"cache {cache_dir}" in result.stdout
    assert any(cache_dir.rglob("*.nbi")), "numba wrote no cache index there"


def test_read_only_install_fails_without_the_fix(tmp_path):
    # control: the same install with the fix disabled (NUMBA_CACHE_DIR set, but empty) cannot import
    _, _, env = read_only_install(tmp_path)
    env["NUMBA_CACHE_DIR"] = ""
    result = run_python(READ_ONLY_SCRIPT, env, tmp_path)
    assert result.returncode != 0 and "cannot cache" in result.stderr


def test_choose_cache_dir(tmp_path):
    writable_pycache = tmp_path / "package" / "__pycache__"
    assert _numba.choose_cache_dir(writable_pycache, tmp_path / "user") is None
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so nothing can be created below it")
    assert _numba.choose_cache_dir(blocked / "__pycache__", tmp_path / "user") == str(tmp_path / "user")
    fallback = _numba.choose_cache_dir(blocked / "__pycache__", blocked / "user")
    assert fallback is not None and fallback.endswith(f"minimrcnn-numba-{os.getuid()}")
