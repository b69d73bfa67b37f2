"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain types and tensors only, so loading it never runs
pickled code::

    format        "minimrcnn-checkpoint"      (what a foreign file lacks)
    version       1
    config        Config.to_dict(), tuples as lists
    model         state dict
    optimizer     state dict                  (training checkpoints only)
    iteration     iterations done
    max_iter      the run's length (a time budget chooses it; resume keeps it)
    rng           torch CPU / CUDA, NumPy and Python generator states, as tensors and ints
    extra         anything else small and plain (class names, warm-up length, ...)

Writing goes to a temporary file in the same folder, which is flushed, fsynced and
then renamed over the target (``os.replace`` is atomic on POSIX), and the folder is
fsynced so the rename itself survives a crash: a reader sees the old checkpoint or the
new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch

from minimrcnn.config import Config

FORMAT_NAME = "minimrcnn-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "model")


# ---------------------------------------------------------------- config


def config_to_dict(config: Config) -> dict:
    """The config as plain JSON-like types (tuples become lists)."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in config.to_dict().items()}


def config_from_dict(values: dict, source: str = "config") -> Config:
    """Rebuild a Config from :func:`config_to_dict`'s output; unknown fields are an error."""
    known = {field.name for field in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown config fields {unknown}")
    converted = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return Config(**converted)


# ---------------------------------------------------------------- RNG states


def capture_rng_states() -> dict:
    """Every generator the training touches, as tensors and ints (safe for ``weights_only``)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- writing


def _fsync_directory(directory: Path) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_torch_save(payload: dict, path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler_state: dict, iteration: int, extra: dict | None = None,
                    config: Config | None = None) -> Path:
    """Write a checkpoint atomically; returns its path.

    ``scheduler_state`` holds at least ``max_iter`` (the schedule is a pure function of the
    iteration, see ``schedule.py``). ``config`` defaults to the model's ``config`` attribute.
    """
    model = unwrap_model(model)
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, Config):
        raise TypeError("config: pass the run's Config (the model has no `config` attribute)")
    if "max_iter" not in scheduler_state:
        raise ValueError("scheduler_state: expected a 'max_iter' entry")
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        "iteration": int(iteration),
        "max_iter": int(scheduler_state["max_iter"]),
        "scheduler": dict(scheduler_state),
        "rng": capture_rng_states(),
        "extra": dict(extra or {}),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    return atomic_torch_save(payload, path)


# ---------------------------------------------------------------- reading


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises FileNotFoundError for a missing file and ValueError naming the file for a
    truncated or corrupt file, a pickle that is not plain data, or another program's file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways (zip, unpickler, memo, OS errors)
        raise ValueError(
            f"{path}: not a readable checkpoint (truncated, corrupt, or holds objects other than "
            f"tensors and plain types): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a minimrcnn checkpoint (no format={FORMAT_NAME!r} entry)")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')!r}, "
                         f"this minimrcnn reads version {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload


def build_model(config: Config) -> torch.nn.Module:
    """The Mask R-CNN of ``config`` (imported lazily: it pulls in every module)."""
    from minimrcnn.modeling.model import MaskRCNN

    return MaskRCNN(config)


def load_model(path, device="cpu") -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint, in eval mode on ``device``, and its config."""
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"], source=str(path))
    # The trained weights replace any pretrained backbone: do not read that file again.
    config = dataclasses.replace(config, backbone_weights=None)
    model = build_model(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the model of its config: {exc}") from exc
    return model.to(device).eval(), config
