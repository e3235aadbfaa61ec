"""Files a user hands in never run code: every entry point that loads a file refuses a pickle
whose ``__reduce__`` would create a file, with a clear error, and the file is never created.

Each payload is first shown to work (unpickled the unsafe way it does create its marker file),
so "the marker does not exist" is a real check, not a vacuous one.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from gradshield.checkpoint import load_model, read_checkpoint, save_checkpoint
from gradshield.cli import main
from gradshield.data import load_archive, load_dataset, sha256_file
from gradshield.errors import GradshieldError
from gradshield.evaluation import run_suite
from gradshield.evaluation.suites import parse_suite
from gradshield.models import create_model
from gradshield.safe_load import UnsafeFileError
from gradshield.training import CHECKPOINT_NAME, TrainConfig, train
from tests._bad_files import (
    DIGITS,
    HTML_PAGE,
    image_archive,
    image_folder,
    tiny_checkpoint,
    write_malicious,
)

HOWS = ("os.system", "exec")
REFUSED = "was refused"


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the file's code ran"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A folder data set of 10 digit-named classes, 2 tiny random images each per split."""
    return image_folder(tmp_path_factory.mktemp("digits"), DIGITS)


def _cli(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("container", ["torch", "pickle"])
@pytest.mark.parametrize("how", HOWS)
def test_the_payloads_do_run_code_when_unpickled_unsafely(tmp_path, how, container):
    """The control: without weights_only the payload creates its marker (so it is a real attack)."""
    ran = tmp_path / "ran"
    path = write_malicious(tmp_path / "evil.pt", ran, how=how, container=container, shape="bare")
    if container == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert ran.exists()


@pytest.mark.parametrize("shape", ["checkpoint", "bare"])
@pytest.mark.parametrize("container", ["torch", "pickle"])
@pytest.mark.parametrize("how", HOWS)
def test_read_checkpoint_and_load_model_refuse_code(tmp_path, marker, how, container, shape):
    path = write_malicious(tmp_path / "evil.pt", marker, how=how, container=container, shape=shape)
    for load in (read_checkpoint, load_model):
        with pytest.raises(UnsafeFileError, match=REFUSED) as caught:
            load(path)
        message = str(caught.value)
        assert "nothing in the file ran" in message and str(path) in message
        assert "will likely succeed" not in message  # torch's advice to load unsafely is not passed on


@pytest.mark.parametrize("how", HOWS)
def test_cli_evaluate_checkpoint_refuses_code(tmp_path, marker, capsys, how):
    path = write_malicious(tmp_path / "evil.pt", marker, how=how)
    err = _cli(["evaluate", "--checkpoint", path, "--data-dir", tmp_path], capsys)
    assert err.startswith("gradshield: error: checkpoint") and REFUSED in err


def test_cli_evaluate_suite_checkpoint_and_surrogate_refuse_code(tmp_path, marker, capsys, digits):
    good = tiny_checkpoint(tmp_path / "good.pt")
    evil = write_malicious(tmp_path / "evil.pt", marker)
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\n[[attack]]\nattack = "fgsm"\neps = "8/255"\nthrough = "transfer"\n')
    common = ["evaluate", "--suite", suite, "--dataset", "folder", "--data-dir", digits,
              "--db", tmp_path / "r.db", "--progress", "none"]
    assert REFUSED in _cli([*common, "--checkpoint", evil], capsys)
    assert REFUSED in _cli([*common, "--checkpoint", good, "--surrogate", evil], capsys)
    assert not (tmp_path / "r.db").exists()


def test_suite_entry_surrogate_refuses_code(tmp_path, marker, capsys, digits):
    evil = write_malicious(tmp_path / "evil.pt", marker)
    suite_text = (f'name = "s"\n[[attack]]\nattack = "fgsm"\neps = "8/255"\nthrough = "transfer"\n'
                  f"surrogate = '{evil}'\n")
    model = create_model("compact", width=0.25)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(UnsafeFileError, match=REFUSED):
        run_suite(model, x, y, parse_suite(suite_text), tmp_path / "a.db", progress="none")
    assert not (tmp_path / "a.db").exists()
    suite = tmp_path / "s.toml"  # the same through the command line
    suite.write_text(suite_text)
    good = tiny_checkpoint(tmp_path / "good.pt")
    assert REFUSED in _cli(["evaluate", "--suite", suite, "--checkpoint", good, "--dataset", "folder",
                            "--data-dir", digits, "--db", tmp_path / "b.db", "--progress", "none"],
                           capsys)
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_torchvision_weights_file_refuses_code(tmp_path, marker, container):
    evil = write_malicious(tmp_path / "w.pth", marker, container=container, shape="state_dict")
    with pytest.raises(UnsafeFileError, match=f"weights file {re.escape(str(evil))} {REFUSED}"):
        create_model("torchvision:resnet18", num_classes=3, weights=evil)


def test_cached_data_file_refuses_code(tmp_path, marker, capsys):
    archive = image_archive(tmp_path / "data" / "cifar10-jpeg.tar.gz")
    cache = tmp_path / "cache"
    splits = load_archive(archive, cache)  # writes the cache file
    [cached] = cache.glob(f"*{sha256_file(archive)[:16]}.pt")
    assert splits["train"].classes == ("a", "b")
    write_malicious(cached, marker, shape="bare")  # someone replaces the cache file
    with pytest.raises(UnsafeFileError, match=f"cached data file .* {REFUSED}"):
        load_archive(archive, cache)
    with pytest.raises(UnsafeFileError, match=REFUSED):
        load_dataset("cifar10-jpeg", tmp_path / "data", cache)
    good = tiny_checkpoint(tmp_path / "good.pt", classes=("a", "b"), image_shape=(3, 8, 8))
    err = _cli(["evaluate", "--checkpoint", good, "--dataset", "cifar10-jpeg", "--data-dir",
                tmp_path / "data", "--cache-dir", cache], capsys)
    assert "cached data file" in err and "delete it and rerun" in err
    assert cached.is_file()  # left for the user to inspect, not silently replaced


def test_truncated_cache_file_is_rebuilt_not_an_error(tmp_path):
    archive = image_archive(tmp_path / "x.tar.gz")
    first = load_archive(archive, tmp_path)
    [cached] = tmp_path.glob(f"*{sha256_file(archive)[:16]}.pt")
    cached.write_bytes(cached.read_bytes()[:100])
    again = load_archive(archive, tmp_path)
    assert torch.equal(again["test"].images, first["test"].images)


def test_training_resume_refuses_code(tmp_path, marker, capsys, digits):
    run_dir = tmp_path / "run"
    write_malicious(run_dir / CHECKPOINT_NAME, marker)
    train_data, _ = load_dataset("folder", digits)
    with pytest.raises(UnsafeFileError, match=REFUSED):
        train(create_model("compact", width=0.25), train_data, None,
              TrainConfig(epochs=1, batch_size=4), run_dir, progress=False)
    err = _cli(["train", "--dataset", "folder", "--data-dir", digits, "--out", run_dir,
                "--epochs", "1", "--batch-size", "4", "--width", "0.25", "--quiet"], capsys)
    assert REFUSED in err


@pytest.mark.parametrize("head", [
    HTML_PAGE,
    b"\xef\xbb\xbf\n  <html><body>404 Not Found</body></html>",
    b"<!-- saved from url=(0014)about:internet -->\n<html><head></head></html>",
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code></Error>',
])
def test_a_saved_web_page_says_so(tmp_path, head):
    page = tmp_path / "model.pt"
    page.write_bytes(head)
    with pytest.raises(GradshieldError, match="not a PyTorch file: the download probably failed") as e:
        read_checkpoint(page)
    assert "saved" in str(e.value) and "download it again" in str(e.value)
    assert "npickl" not in str(e.value)  # not an unpickling trace
    with pytest.raises(GradshieldError, match=r"weights file .* is a saved"):
        create_model("torchvision:resnet18", weights=page)


def test_a_git_lfs_pointer_says_so(tmp_path):
    pointer = tmp_path / "model.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 4567\n")
    with pytest.raises(GradshieldError, match=r"Git LFS pointer.*git lfs pull"):
        load_model(pointer)


def test_a_real_training_checkpoint_is_plain_data(tmp_path, digits):
    """What train() writes (optimiser, RNG state, metrics, configs, recipe) loads weights-only and
    records the data it was trained on; exact resume is tested in test_training.py."""
    train_data, test_data = load_dataset("folder", digits)
    torch.manual_seed(0)
    model = create_model("compact", width=0.25)
    train(model, train_data, test_data, TrainConfig(epochs=1, batch_size=4), tmp_path, progress=False)
    blob = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert blob["classes"] == list(DIGITS) and blob["image_shape"] == [3, 32, 32]
    assert {"optimizer_state", "rng_state", "metrics", "fingerprint"} <= set(blob)


def test_save_checkpoint_refuses_what_a_weights_only_load_would_refuse(tmp_path):
    for bad in ({"where": Path("x")}, {"config": TrainConfig()}, {"fn": print}):
        with pytest.raises(GradshieldError, match="plain"):
            save_checkpoint(tmp_path / "c.pt", bad)
    assert not (tmp_path / "c.pt").exists()


def test_no_unsafe_loading_anywhere_in_the_source():
    """Every file is read through gradshield.safe_load (torch.load weights_only=True)."""
    root = Path(__file__).resolve().parents[1]
    unsafe = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|"
                        r"torch\.load\(|dill|cloudpickle|joblib\.load")
    found = []
    for folder in ("src", "benchmarks"):
        for file in sorted((root / folder).rglob("*.py")):
            if file.name == "safe_load.py":
                continue
            found += [f"{file.relative_to(root)}:{i}: {line.strip()}"
                      for i, line in enumerate(file.read_text().splitlines(), 1) if unsafe.search(line)]
    assert not found, found
    calls = [line for line in (root / "src" / "gradshield" / "safe_load.py").read_text().splitlines()
             if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for line in calls)
