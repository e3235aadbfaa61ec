"""A checkpoint records the data it was trained on (class names, image shape); evaluating it on
other data is a clear error, at ``gradshield evaluate`` (plain and --suite) and in ``run_suite``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from gradshield.checkpoint import DataIdentity, load_model, read_checkpoint, save_checkpoint
from gradshield.cli import main
from gradshield.data import CIFAR10_CLASSES
from gradshield.defenses.concealment import conceal
from gradshield.errors import GradshieldError
from gradshield.evaluation import run_suite
from gradshield.evaluation.suites import parse_suite
from gradshield.models import create_model
from tests._bad_files import DIGITS, image_folder, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("GRADSHIELD_DATA") or REPO.parent / "shared" / "datasets").resolve()
SUITE = 'name = "one"\n[[attack]]\nattack = "fgsm"\neps = "8/255"\n'
NAMES_DIFFER = r"was trained on the classes \['0', '1', '2', '3', \.\.\.\] \(10\) but "


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A folder data set: 10 classes named '0'..'9', 2 random 32x32 images per class and split."""
    return image_folder(tmp_path_factory.mktemp("digits"), DIGITS)


@pytest.fixture(scope="module")
def digits_checkpoint(digits, tmp_path_factory) -> Path:
    """A compact net trained by the CLI for one epoch on the digit folder."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "folder", "--data-dir", str(digits), "--epochs", "1",
                 "--batch-size", "10", "--width", "0.25", "--quiet", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def _fails(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def test_training_records_the_data_identity(digits_checkpoint):
    blob = read_checkpoint(digits_checkpoint)
    assert blob["classes"] == list(DIGITS) and blob["image_shape"] == [3, 32, 32]
    model, _ = load_model(digits_checkpoint)
    assert model.data_identity == DataIdentity(10, DIGITS, 3, (32, 32))


def test_a_digit_checkpoint_on_cifar10_is_an_error_not_10_percent(digits_checkpoint, tmp_path, capsys):
    """Same number of classes (10), other classes: the count check alone would let it through."""
    err = _fails(["evaluate", "--checkpoint", digits_checkpoint, "--data-dir", CIFAR_DIR,
                  "--test-limit", "20"], capsys)
    assert "'airplane', 'automobile'" in err and "the data set cifar10" in err
    assert re.search(NAMES_DIFFER, err)
    suite = tmp_path / "one.toml"
    suite.write_text(SUITE)
    err = _fails(["evaluate", "--suite", suite, "--checkpoint", digits_checkpoint, "--data-dir",
                  CIFAR_DIR, "--test-limit", "20", "--db", tmp_path / "r.db", "--progress", "none"],
                 capsys)
    assert "'airplane'" in err and not (tmp_path / "r.db").exists()


def test_run_suite_checks_the_classes_it_is_given(digits_checkpoint, tmp_path, cifar):
    model, _ = load_model(digits_checkpoint)
    x, y = cifar[1].subset(8, seed=0).as_float()
    for evaluated in (model, conceal(model, at="front")):  # also through the GCM wrapper
        with pytest.raises(GradshieldError, match=NAMES_DIFFER + r"the data set has the classes"):
            run_suite(evaluated, x, y, parse_suite(SUITE), tmp_path / "r.db", classes=CIFAR10_CLASSES,
                      progress="none")
        assert not (tmp_path / "r.db").exists()
    with pytest.raises(GradshieldError, match="trained on 32x32 images but the data set has 24x24"):
        run_suite(model, x[:, :, :24, :24], y, parse_suite(SUITE), tmp_path / "r.db", progress="none")
    python_model = create_model("compact", width=0.25)  # no identity; its surrogate has one
    with pytest.raises(GradshieldError, match="the surrogate was trained on the classes"):
        run_suite(python_model, x, y, parse_suite(SUITE), tmp_path / "r.db", classes=CIFAR10_CLASSES,
                  surrogate=model, progress="none")
    assert not (tmp_path / "r.db").exists()


def test_other_class_count_image_size_or_class_order(digits, digits_checkpoint, tmp_path, capsys):
    three = image_folder(tmp_path / "three", ("0", "1", "2"), per_class=1)
    err = _fails(["evaluate", "--checkpoint", digits_checkpoint, "--dataset", "folder", "--data-dir",
                  three], capsys)
    assert "has 10 classes but the data set folder has 3 ['0', '1', '2'] (3)" in err
    err = _fails(["evaluate", "--checkpoint", digits_checkpoint, "--dataset", "folder", "--data-dir",
                  digits, "--image-size", "24", "24"], capsys)
    assert "trained on 32x32 images but the data set folder has 24x24 images" in err
    assert "--image-size 32 32" in err
    reordered = tiny_checkpoint(tmp_path / "rev.pt", classes=DIGITS[::-1])
    err = _fails(["evaluate", "--checkpoint", reordered, "--dataset", "folder", "--data-dir", digits],
                 capsys)
    assert "the same names in another order" in err
    gray = tiny_checkpoint(tmp_path / "gray.pt", image_shape=(1, 32, 32))
    assert "trained on 1-channel images" in _fails(
        ["evaluate", "--checkpoint", gray, "--dataset", "folder", "--data-dir", digits], capsys)


def test_surrogate_trained_on_other_classes_is_refused(digits, digits_checkpoint, tmp_path, capsys):
    other = tiny_checkpoint(tmp_path / "other.pt", classes=tuple("abcdefghij"))
    suite = tmp_path / "t.toml"
    suite.write_text(SUITE + 'through = "transfer"\n')
    err = _fails(["evaluate", "--suite", suite, "--checkpoint", digits_checkpoint, "--surrogate", other,
                  "--dataset", "folder", "--data-dir", digits, "--db", tmp_path / "r.db",
                  "--progress", "none"], capsys)
    assert f"the surrogate {other} was trained on the classes ['a', 'b', 'c', 'd', ...]" in err


def test_matching_data_evaluates(digits, digits_checkpoint, capsys):
    assert main(["evaluate", "--checkpoint", str(digits_checkpoint), "--dataset", "folder",
                 "--data-dir", str(digits)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 20


def test_old_checkpoints_load_and_are_checked_on_what_they_hold(digits, digits_checkpoint, tmp_path,
                                                                capsys):
    blob = read_checkpoint(digits_checkpoint)
    for key in ("format", "version", "image_shape"):
        blob.pop(key)
    with_classes = save_checkpoint(tmp_path / "classes-only.pt", blob)
    model, _ = load_model(with_classes)
    assert model.data_identity == DataIdentity(10, DIGITS, 3, None)
    assert "'airplane'" in _fails(["evaluate", "--checkpoint", with_classes, "--data-dir", CIFAR_DIR,
                                   "--test-limit", "20"], capsys)
    blob.pop("classes")
    bare = save_checkpoint(tmp_path / "bare.pt", blob)  # as checkpoints saved by hand
    assert load_model(bare)[0].data_identity == DataIdentity(10, None, 3, None)
    assert main(["evaluate", "--checkpoint", str(bare), "--dataset", "folder", "--data-dir",
                 str(digits), "--image-size", "24", "24"]) == 0  # nothing recorded to check
    capsys.readouterr()
    five = tiny_checkpoint(tmp_path / "five.pt", classes=DIGITS[:5], record=False)
    assert "has 5 classes but the data set folder has 10" in _fails(
        ["evaluate", "--checkpoint", five, "--dataset", "folder", "--data-dir", digits], capsys)


def test_identity_check_accepts_its_own_data():
    identity = DataIdentity(3, ("a", "b", "c"), 3, (8, 8))
    identity.check(["a", "b", "c"], torch.Size([3, 8, 8]))
    identity.check(None, None)
