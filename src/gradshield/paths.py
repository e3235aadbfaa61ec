"""Where gradshield looks for data and keeps its cache.

- data directory: ``--data-dir`` > ``$GRADSHIELD_DATA`` > ``./data``
- cache directory: ``--cache-dir`` > ``$GRADSHIELD_CACHE`` > ``~/.cache/gradshield``

The cache holds decoded data sets and other derived files; it lives outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "GRADSHIELD_DATA"
CACHE_ENV = "GRADSHIELD_CACHE"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory that holds data sets (archives, image folders, torchvision roots)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path("data")


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The directory for derived files (decoded tensors, test fixtures); created on demand."""
    if explicit is not None:
        path = Path(explicit).expanduser()
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        path = Path.home() / ".cache" / "gradshield"
    path.mkdir(parents=True, exist_ok=True)
    return path
