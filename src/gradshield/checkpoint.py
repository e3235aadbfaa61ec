"""Checkpoint files: atomic writes, metadata to rebuild the model, clear errors on bad files.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "gradshield-checkpoint", "version": 1, "model_config": {...},
     "model_state": {...}, "classes": [...],
     ...training state (optional)...}

It holds only tensors and plain data, and is read weights-only (``torch.load`` with
``weights_only=True``, :mod:`gradshield.safe_load`): loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gradshield.errors import GradshieldError
from gradshield.models import ModelConfig, NormalizedClassifier, build_model
from gradshield.safe_load import check_plain, load_torch_file

FORMAT = "gradshield-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` atomically (temp file + rename): a kill never leaves a half-written file.

    The payload must be plain data (dicts, lists, tuples, strings, numbers, None, tensors), so
    that the file loads with ``weights_only=True``; anything else is refused before writing.
    """
    path = Path(path)
    check_plain(payload, "checkpoint payload")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict (weights-only: never runs code from the file), with a clear error
    for a missing, truncated, foreign or unsafe file or a saved web page."""
    path = Path(path)
    if not path.is_file():
        raise GradshieldError(f"checkpoint not found: {path}; train one with `gradshield train`"
                              " or check the path")
    blob = load_torch_file(
        path, what="checkpoint",
        remedy="copy or download it again, or re-run the training that wrote it (training resumes "
               "from the last good epoch)")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise GradshieldError(
            f"{path} is not a gradshield checkpoint (no 'format': {FORMAT!r}); to use weights "
            "from elsewhere, build the model with gradshield.models.create_model and "
            "load_state_dict yourself")
    if blob.get("version", 0) > VERSION:
        raise GradshieldError(f"{path} was written by a newer gradshield (version "
                              f"{blob['version']} > {VERSION}); upgrade gradshield")
    return blob


def load_weights(model: nn.Module, state: dict, *, source: str = "checkpoint") -> None:
    """Load a state dict, explaining an architecture mismatch instead of dumping key lists."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        expected = getattr(model, "config", None)
        described = (f" ({expected.arch}, width {expected.width}, {expected.num_classes} classes)"
                     if expected else "")
        raise GradshieldError(
            f"the {source} does not fit this model{described}: "
            f"{str(err).splitlines()[0]} ... Build the model the checkpoint was trained with "
            "(gradshield.checkpoint.load_model does it from the file)") from err


def load_model(path: str | os.PathLike, *, expect: ModelConfig | None = None
               ) -> tuple[NormalizedClassifier, dict]:
    """Rebuild the model stored in a checkpoint; returns (model in eval mode, checkpoint dict).

    ``expect``: if given, the checkpoint's architecture/width/classes must match it.
    """
    blob = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(blob["model_config"])
        state = blob["model_state"]
    except (KeyError, TypeError) as err:
        raise GradshieldError(f"checkpoint {path} lacks model metadata ({err})") from err
    if expect is not None:
        mine = (config.arch, config.width, config.num_classes)
        theirs = (expect.arch, expect.width, expect.num_classes)
        if mine != theirs:
            raise GradshieldError(
                f"checkpoint {path} holds arch/width/classes {mine}, expected {theirs}")
    model = build_model(config)
    load_weights(model, state, source=f"checkpoint {path}")
    return model.eval(), blob
