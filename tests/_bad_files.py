"""Builders for the files a user might hand in, good and bad: tiny checkpoints, image folders,
pickles that would run code, saved web pages. Shared by test_security.py and test_bad_inputs.py."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gradshield.checkpoint import FORMAT, VERSION, save_checkpoint
from gradshield.models import create_model

DIGITS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
HTML_PAGE = (b"<!DOCTYPE html>\n<html lang=\"en\"><head><title>Sign in</title></head>"
             b"<body>Please sign in to download this file.</body></html>\n")


class RunsCode:
    """Pickles to a call that creates ``marker``: by ``os.system('touch ...')`` or ``exec``."""

    def __init__(self, how: str, marker: Path) -> None:
        self.how, self.marker = how, Path(marker)

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {shlex.quote(str(self.marker))}",)
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def write_malicious(path: Path, marker: Path, *, how: str = "os.system", container: str = "torch",
                    shape: str = "checkpoint") -> Path:
    """A file whose unpickling would create ``marker``.

    ``container``: ``"torch"`` (``torch.save``'s zip) or ``"pickle"`` (a bare pickle stream, as
    torch's legacy format). ``shape``: ``"checkpoint"`` (a well-formed gradshield checkpoint with
    the payload in one field: the format check alone cannot stop it), ``"state_dict"`` (a weights
    file with a payload entry) or ``"bare"`` (the object itself).
    """
    payload: object = RunsCode(how, marker)
    if shape == "checkpoint":
        model = create_model("compact", width=0.25)
        payload = {"format": FORMAT, "version": VERSION, "model_config": model.config.to_dict(),
                   "model_state": model.state_dict(), "classes": list(DIGITS), "note": payload}
    elif shape == "state_dict":
        payload = {"fc.bias": torch.zeros(3), "extra": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    return path


def tiny_checkpoint(path: Path, *, classes=DIGITS, image_shape=(3, 32, 32), seed: int = 0,
                    record: bool = True) -> Path:
    """A random-init compact net (width 0.25) saved as a gradshield checkpoint; ``record``: also
    store the data identity (classes, image shape), as training does."""
    torch.manual_seed(seed)
    model = create_model("compact", num_classes=len(classes), width=0.25,
                         input_size=tuple(image_shape[1:]))
    payload = {"model_config": model.config.to_dict(), "model_state": model.state_dict()}
    if record:
        payload.update(classes=list(classes), image_shape=list(image_shape))
    return save_checkpoint(path, payload)


def png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, classes, *, per_class: int = 2, size=(32, 32),
                 splits=("train", "test")) -> Path:
    """``root/<split>/<class>/<i>.png`` with random images: a ``--dataset folder`` data set."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}.png").write_bytes(png(1000 * s + 10 * c + i, size))
    return root


def image_archive(path: Path, classes=("a", "b")) -> Path:
    """A small ``.tar.gz`` in the archive layout ``<split>/<class>/<image>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                blob = png(c, (8, 8))
                info = tarfile.TarInfo(f"{split}/{name}/{c}.png")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
    return path
