"""Shared fixtures: the bundled CIFAR-10 and a small real model trained on it (cached).

The data directory is $GRADSHIELD_DATA, else ../shared/datasets beside the repository.
The trained model is cached in the gradshield cache directory, keyed by the source of the code
that produced it, so a change to training or the model retrains it (~30 s on 2 cores).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch

from gradshield.checkpoint import load_model
from gradshield.data import ARCHIVE_NAME, load_dataset
from gradshield.models import create_model
from gradshield.paths import cache_dir
from gradshield.training import CHECKPOINT_NAME, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "gradshield"
FIXTURE_TRAIN_SIZE = 10_000
FIXTURE_EPOCHS = 4


def data_dir() -> Path:
    return Path(os.environ.get("GRADSHIELD_DATA") or REPO.parent / "shared" / "datasets")


@pytest.fixture(scope="session")
def cifar():
    """(train, test) ImageData of the bundled CIFAR-10 archive."""
    root = data_dir()
    if not (root / ARCHIVE_NAME).is_file():
        pytest.fail(f"{ARCHIVE_NAME} not found in {root}; set GRADSHIELD_DATA to its folder")
    return load_dataset("cifar10", root)


@pytest.fixture(scope="session")
def test_batch(cifar):
    """512 real CIFAR-10 test images (float32 in [0, 1]) and labels, a fixed seeded subset."""
    return cifar[1].subset(512, seed=0).as_float()


def _fixture_key() -> str:
    digest = hashlib.sha256()
    for rel in ("training.py", "data.py", "models/compact.py", "models/registry.py",
                "defenses/recipes.py"):
        digest.update((SRC / rel).read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def _trained_compact(cifar):
    run_dir = cache_dir() / "test-fixtures" / f"compact-{_fixture_key()}"
    if not (run_dir / CHECKPOINT_NAME).is_file():
        torch.manual_seed(0)
        model = create_model("compact")
        train_data = cifar[0].subset(FIXTURE_TRAIN_SIZE, seed=0)
        train(model, train_data, None, TrainConfig(epochs=FIXTURE_EPOCHS, seed=0), run_dir,
              progress=False)
    model, _ = load_model(run_dir / CHECKPOINT_NAME)
    return model


@pytest.fixture
def trained_model(_trained_compact):
    """A fresh copy (eval mode) of a compact net trained 4 epochs on 10k bundled CIFAR-10 images
    (about 65-70 % test accuracy). Tests may modify it freely."""
    return copy.deepcopy(_trained_compact).eval()


# --------------------------------------------------------------------------- adversarially trained


AT_FIXTURE_EPOCHS = 4
AT_FIXTURE_OPTIONS = {"eps": 8 / 255, "steps": 3, "step_size": 2.5 * (8 / 255) / 3}


@pytest.fixture(scope="session")
def _at_compact(cifar):
    """The compact net adversarially trained (recipe ``at``: PGD-L-inf 8/255, 3 steps) for
    AT_FIXTURE_EPOCHS epochs on the fixture's 10k images; cached like ``_trained_compact``."""
    from gradshield.defenses.recipes import make_recipe

    settings = repr((_fixture_key(), AT_FIXTURE_EPOCHS, sorted(AT_FIXTURE_OPTIONS.items())))
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    run_dir = cache_dir() / "test-fixtures" / f"at-compact-{key}"  # not matched by compact-*
    if not (run_dir / CHECKPOINT_NAME).is_file():
        torch.manual_seed(0)
        model = create_model("compact")
        train_data = cifar[0].subset(FIXTURE_TRAIN_SIZE, seed=0)
        train(model, train_data, None, TrainConfig(epochs=AT_FIXTURE_EPOCHS, seed=0), run_dir,
              recipe=make_recipe("at", **AT_FIXTURE_OPTIONS), progress=False)
    model, _ = load_model(run_dir / CHECKPOINT_NAME)
    return model


@pytest.fixture
def at_model(_at_compact):
    """A fresh copy (eval mode) of the adversarially trained compact net (see ``_at_compact``)."""
    return copy.deepcopy(_at_compact).eval()
