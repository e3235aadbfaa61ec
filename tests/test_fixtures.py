"""The cached fixture model: trained in the precision asked for, keyed by everything that makes it,
and reused only when its training finished."""

from __future__ import annotations

import torch

from gradshield.checkpoint import read_checkpoint, save_checkpoint
from gradshield.training import CHECKPOINT_NAME
from tests.conftest import (
    AMP_CHOICES,
    FIXTURE_EPOCHS,
    _finished_epochs,
    _fixture_key,
    fixture_amp,
    fixture_run_dir,
)


def test_the_fixture_model_is_finished_and_in_the_requested_precision(_trained_compact):
    blob = read_checkpoint(fixture_run_dir(fixture_amp()) / CHECKPOINT_NAME)
    assert blob["train_config"]["amp"] == fixture_amp()
    assert blob["epoch"] == FIXTURE_EPOCHS - 1
    state = _trained_compact.state_dict()
    assert all(torch.equal(state[k], v) for k, v in blob["model_state"].items())


def test_the_key_depends_on_the_precision_and_the_torch_version(monkeypatch):
    keys = {amp: _fixture_key(amp) for amp in AMP_CHOICES}
    assert len(set(keys.values())) == len(AMP_CHOICES)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _fixture_key("off") != keys["off"]


def test_a_run_cut_short_or_damaged_is_not_reused(tmp_path):
    assert _finished_epochs(tmp_path) == 0
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, {"epoch": FIXTURE_EPOCHS - 2})  # killed during the last epoch
    assert _finished_epochs(tmp_path) == FIXTURE_EPOCHS - 1
    save_checkpoint(path, {"epoch": FIXTURE_EPOCHS - 1})
    assert _finished_epochs(tmp_path) == FIXTURE_EPOCHS
    path.write_bytes(path.read_bytes()[:100])  # truncated: removed, trained again
    assert _finished_epochs(tmp_path) == 0 and not path.exists()
