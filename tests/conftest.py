"""Shared fixtures: the bundled CIFAR-10 and a small real model trained on it (cached).

The data directory is $GRADSHIELD_DATA, else ../shared/datasets beside the repository. Both it and
$GRADSHIELD_CACHE are exported as absolute paths when this file is imported, so the subprocesses
that tests start (often with another working directory) find the same folders.

The trained model's precision is $GRADSHIELD_TEST_AMP: ``off`` (float32, the default) or ``bf16``
(bfloat16 autocast). The two give different models, as do different CPUs: no test may depend on
the exact weights. The model is cached in the gradshield cache directory under a key of all the
library's source, this file, the torch version and the precision, and is reused only once its
training has finished (an interrupted one resumes; ~30-60 s on 2 cores from scratch).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch

from gradshield import paths
from gradshield.checkpoint import load_model, read_checkpoint
from gradshield.data import ARCHIVE_NAME, ImageData, load_dataset
from gradshield.errors import GradshieldError
from gradshield.models import create_model
from gradshield.training import CHECKPOINT_NAME, TrainConfig, train

try:
    import fcntl
except ImportError:  # not POSIX: no lock between concurrent test runs
    fcntl = None

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "gradshield"
FIXTURE_TRAIN_SIZE = 10_000
FIXTURE_EPOCHS = 4
AMP_ENV = "GRADSHIELD_TEST_AMP"
AMP_CHOICES = ("off", "bf16")


def data_dir() -> Path:
    """The data folder as an absolute path."""
    if os.environ.get(paths.DATA_ENV):
        return paths.data_dir()
    return REPO.parent / "shared" / "datasets"


def _export_absolute_paths() -> None:
    os.environ[paths.DATA_ENV] = str(data_dir())
    if os.environ.get(paths.CACHE_ENV):
        os.environ[paths.CACHE_ENV] = str(paths.cache_dir())


_export_absolute_paths()


def fixture_amp() -> str:
    """The fixture model's training precision, from $GRADSHIELD_TEST_AMP (default ``off``)."""
    amp = os.environ.get(AMP_ENV) or "off"
    if amp not in AMP_CHOICES:
        raise pytest.UsageError(f"{AMP_ENV}={amp!r}: choose one of {', '.join(AMP_CHOICES)}")
    return amp


def pytest_configure(config):
    fixture_amp()  # a bad value stops the run before any test


def pytest_report_header(config):
    return f"fixture model precision: {AMP_ENV}={fixture_amp()}; data: {data_dir()}"


def class_balanced(data: ImageData, per_class: int, seed: int = 0) -> ImageData:
    """``per_class`` random images of every class, in blocks of one image per class (in random
    order within a block): any prefix, and any evenly spaced selection, is near class-balanced."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for label in range(data.num_classes):
        index = (data.labels == label).nonzero().flatten()
        picks.append(index[torch.randperm(len(index), generator=gen)[:per_class]])
    picks = torch.stack(picks, 1)  # (per_class, classes)
    order = torch.stack([torch.randperm(data.num_classes, generator=gen) for _ in range(per_class)])
    index = picks.gather(1, order).flatten()
    return ImageData(data.images[index], data.labels[index], data.classes)


@pytest.fixture(scope="session")
def cifar():
    """(train, test) ImageData of the bundled CIFAR-10 archive."""
    root = data_dir()
    if not (root / ARCHIVE_NAME).is_file():
        pytest.fail(f"{ARCHIVE_NAME} not found in {root}; set GRADSHIELD_DATA to its folder")
    return load_dataset("cifar10", root)


@pytest.fixture(scope="session")
def test_batch(cifar):
    """520 real CIFAR-10 test images (float32 in [0, 1]) and labels: 52 per class, in blocks of
    ten holding each class once (see :func:`class_balanced`), a fixed seeded selection."""
    return class_balanced(cifar[1], 52, seed=0).as_float()


def _fixture_key(amp: str) -> str:
    """A digest of everything that determines the fixture model."""
    digest = hashlib.sha256()
    for path in sorted(SRC.rglob("*.py")):
        digest.update(path.relative_to(SRC).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(Path(__file__).read_bytes())
    digest.update(f"\0torch {torch.__version__}\0amp {amp}".encode())
    return digest.hexdigest()[:12]


def _finished_epochs(run_dir: Path) -> int:
    """Epochs of the fixture run finished in ``run_dir`` (0 if none; a damaged file is removed)."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    try:
        return int(read_checkpoint(path)["epoch"]) + 1
    except (GradshieldError, KeyError, TypeError, ValueError):
        path.unlink()
        return 0


def fixture_run_dir(amp: str, name: str = "compact") -> Path:
    """Where the fixture model ``name`` trained in precision ``amp`` is cached."""
    return paths.cache_dir() / "test-fixtures" / f"{name}-{amp}-{_fixture_key(amp)}"


def _train_fixture(cifar, name: str, epochs: int, recipe=None):
    """Train (or resume, or load) the cached fixture model ``name``: the compact net, seed 0, on
    the fixture's 10k images, in the precision of $GRADSHIELD_TEST_AMP."""
    amp = fixture_amp()
    run_dir = fixture_run_dir(amp, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "w") as lock:
        if fcntl is not None:  # another test run training the same fixture: wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _finished_epochs(run_dir) < epochs:  # new, or cut short: train / resume
            torch.manual_seed(0)
            model = create_model("compact")
            train_data = cifar[0].subset(FIXTURE_TRAIN_SIZE, seed=0)
            train(model, train_data, None, TrainConfig(epochs=epochs, seed=0, amp=amp),
                  run_dir, recipe=recipe, progress=False)
        finished = _finished_epochs(run_dir)
    if finished != epochs:
        pytest.fail(f"the fixture model in {run_dir} has {finished} of {epochs} epochs")
    model, _ = load_model(run_dir / CHECKPOINT_NAME)
    return model


@pytest.fixture(scope="session")
def _trained_compact(cifar):
    return _train_fixture(cifar, "compact", FIXTURE_EPOCHS)


@pytest.fixture
def trained_model(_trained_compact):
    """A fresh copy (eval mode) of a compact net trained 4 epochs on 10k bundled CIFAR-10 images
    in the precision of $GRADSHIELD_TEST_AMP. Tests may modify it freely."""
    return copy.deepcopy(_trained_compact).eval()


# --------------------------------------------------------------------------- adversarially trained


AT_FIXTURE_EPOCHS = 4
AT_FIXTURE_OPTIONS = {"eps": 8 / 255, "steps": 3, "step_size": 2.5 * (8 / 255) / 3}


@pytest.fixture(scope="session")
def _at_compact(cifar):
    """The compact net adversarially trained (recipe ``at``: PGD-L-inf 8/255, 3 steps) for
    AT_FIXTURE_EPOCHS epochs on the fixture's 10k images; cached like ``_trained_compact``
    (under at-compact-*, which the benchmarks' compact-* glob does not match)."""
    from gradshield.defenses.recipes import make_recipe

    return _train_fixture(cifar, "at-compact", AT_FIXTURE_EPOCHS,
                          recipe=make_recipe("at", **AT_FIXTURE_OPTIONS))


@pytest.fixture
def at_model(_at_compact):
    """A fresh copy (eval mode) of the adversarially trained compact net (see ``_at_compact``)."""
    return copy.deepcopy(_at_compact).eval()
