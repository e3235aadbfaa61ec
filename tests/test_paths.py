"""Data and cache folders: relative paths from the environment are resolved where they are read,
so a subprocess started with another working directory still finds the data."""

from __future__ import annotations

import os
import subprocess
import sys

from gradshield import paths
from tests.conftest import REPO, data_dir


def test_relative_environment_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.DATA_ENV, "some/data")
    monkeypatch.setenv(paths.CACHE_ENV, "../cache")
    assert paths.data_dir() == tmp_path / "some" / "data"
    assert paths.cache_dir() == tmp_path.parent / "cache" and (tmp_path.parent / "cache").is_dir()
    monkeypatch.delenv(paths.DATA_ENV)
    assert paths.data_dir() == tmp_path / "data"
    assert paths.data_dir("given") == paths.Path("given")  # an explicit path is the caller's


def test_the_test_session_hands_subprocesses_absolute_paths(tmp_path):
    """The README's test command sets GRADSHIELD_DATA relative to the repository; tests start
    subprocesses in other folders. conftest exports the absolute path, and a process started
    elsewhere by a process that imported it finds the data."""
    assert os.path.isabs(os.environ[paths.DATA_ENV])
    assert os.environ[paths.DATA_ENV] == str(data_dir())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    child = ("from gradshield.data import load_dataset; "
             "train, test = load_dataset('cifar10'); print(len(train), len(test))")
    parent = ("import os, subprocess, sys\n"
              "import tests.conftest  # what pytest does first\n"
              "print(os.environ['GRADSHIELD_DATA'])\n"
              f"done = subprocess.run([sys.executable, '-c', {child!r}], cwd={str(elsewhere)!r})\n"
              "sys.exit(done.returncode)\n")
    relative = os.path.relpath(data_dir(), REPO)
    assert not os.path.isabs(relative)
    done = subprocess.run([sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, paths.DATA_ENV: relative})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(data_dir()), "50000", "10000"]
