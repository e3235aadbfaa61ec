"""Where gradshield looks for data and keeps its cache.

- data directory: ``--data-dir`` > ``$GRADSHIELD_DATA`` > ``./data``
- cache directory: ``--cache-dir`` > ``$GRADSHIELD_CACHE`` > ``~/.cache/gradshield``

A relative ``$GRADSHIELD_DATA`` / ``$GRADSHIELD_CACHE`` (or default) is resolved against the
working directory at the moment it is read and returned as an absolute path, so a path handed on
(to a subprocess with another working directory, into a results file) still points at the same
folder. The cache holds decoded data sets and other derived files; it lives outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "GRADSHIELD_DATA"
CACHE_ENV = "GRADSHIELD_CACHE"


def _absolute(path: str) -> Path:
    """``path`` (``~`` expanded) made absolute against the current working directory."""
    return Path(os.path.abspath(Path(path).expanduser()))


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory that holds data sets (archives, image folders, torchvision roots)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return _absolute(os.environ[DATA_ENV])
    return _absolute("data")


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory for derived files (decoded tensors, test fixtures); created on demand."""
    if explicit is not None:
        path = Path(explicit).expanduser()
    elif os.environ.get(CACHE_ENV):
        path = _absolute(os.environ[CACHE_ENV])
    else:
        path = Path.home() / ".cache" / "gradshield"
    path.mkdir(parents=True, exist_ok=True)
    return path
