"""Checkpoints: atomic writes, weights_only loading, clear errors, RNG round trips, load_model."""

import dataclasses
import pickle
import random

import numpy as np
import pytest
import torch

from minimrcnn.config import get_config
from minimrcnn.engine import checkpoint as ckpt


class TinyModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)


@pytest.fixture
def config():
    return dataclasses.replace(get_config("shapes-cpu"), max_iter=7)


def _save(path, model, iteration=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.linear.weight.grad = torch.ones_like(model.linear.weight)
    optimizer.step()
    ckpt.save_checkpoint(path, model, optimizer, {"max_iter": 7, "warmup_iters": 2}, iteration,
                         extra={"class_names": ["square"]})
    return optimizer


def test_round_trip_holds_everything_and_loads_weights_only(tmp_path, config):
    model = TinyModel(config)
    optimizer = _save(tmp_path / "last.pth", model)
    payload = ckpt.load_checkpoint(tmp_path / "last.pth")
    assert payload["iteration"] == 3 and payload["max_iter"] == 7
    assert payload["scheduler"]["warmup_iters"] == 2
    assert payload["extra"]["class_names"] == ["square"]
    assert ckpt.config_from_dict(payload["config"]) == config  # tuples come back as tuples
    for name, value in model.state_dict().items():
        assert torch.equal(payload["model"][name], value)
    restored = torch.optim.SGD(TinyModel(config).parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(payload["optimizer"])
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(restored.state_dict()["state"][0]["momentum_buffer"], momentum)
    # The file holds tensors and plain types only: the strict loader reads it directly.
    torch.load(tmp_path / "last.pth", weights_only=True)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's legacy state
    states = ckpt.capture_rng_states()
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt.restore_rng_states(states)
    got = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_crash_mid_write_keeps_the_old_file(tmp_path, config, monkeypatch):
    path = tmp_path / "last.pth"
    model = TinyModel(config)
    _save(path, model, iteration=3)
    before = path.read_bytes()

    def failing_save(payload, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, model, iteration=4)
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["iteration"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_truncated_file_is_a_clear_error(tmp_path, config):
    path = tmp_path / "last.pth"
    _save(path, TinyModel(config))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"last\.pth: not a readable checkpoint"):
        ckpt.load_checkpoint(path)


def test_foreign_files_are_clear_errors(tmp_path):
    plain_state_dict = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, plain_state_dict)
    with pytest.raises(ValueError, match=r"resnet\.pth: not a minimrcnn checkpoint"):
        ckpt.load_checkpoint(plain_state_dict)

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pth: not a readable checkpoint"):
        ckpt.load_checkpoint(text)

    # A pickle that would run code on load is refused by weights_only, not executed.
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"format": ckpt.FORMAT_NAME, "payload": Evil()}, handle, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pth: not a readable checkpoint"):
        ckpt.load_checkpoint(evil)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")


def test_unknown_config_fields_are_named():
    values = ckpt.config_to_dict(get_config("shapes-cpu"))
    values["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="learning_rate"):
        ckpt.config_from_dict(values, source="run/last.pth")


def test_load_model_rebuilds_from_the_config(tmp_path, config, monkeypatch):
    model = TinyModel(config)
    _save(tmp_path / "model_final.pth", model)
    monkeypatch.setattr(ckpt, "build_model", TinyModel)
    loaded, loaded_config = ckpt.load_model(tmp_path / "model_final.pth")
    assert loaded_config == config and not loaded.training
    assert torch.equal(loaded.linear.weight, model.linear.weight)

    class OtherModel(TinyModel):
        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(5, 2)

    monkeypatch.setattr(ckpt, "build_model", OtherModel)
    with pytest.raises(ValueError, match="do not fit"):
        ckpt.load_model(tmp_path / "model_final.pth")
