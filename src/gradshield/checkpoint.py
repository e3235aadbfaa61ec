"""Checkpoint files: atomic writes, metadata to rebuild the model, clear errors on bad files.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "gradshield-checkpoint", "version": 1, "model_config": {...},
     "model_state": {...}, "classes": [...], "image_shape": [C, H, W],
     ...training state (optional)...}

It holds only tensors and plain data, and is read weights-only (``torch.load`` with
``weights_only=True``, :mod:`gradshield.safe_load`): loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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


def _names(classes: Sequence[str], shown: int = 4) -> str:
    head = ", ".join(repr(c) for c in list(classes)[:shown])
    return f"[{head}{', ...' if len(classes) > shown else ''}] ({len(classes)})"


@dataclass(frozen=True)
class DataIdentity:
    """What a model was trained on: its class count, and where recorded the class names (in
    label order) and the image shape (C, H, W). Checkpoints written before ``image_shape`` was
    recorded give only what they hold (``None`` fields are not checked)."""

    num_classes: int
    classes: tuple[str, ...] | None = None
    channels: int | None = None
    image_size: tuple[int, int] | None = None

    @classmethod
    def from_checkpoint(cls, blob: dict, config: ModelConfig) -> DataIdentity:
        classes = blob.get("classes")
        shape = blob.get("image_shape")
        return cls(num_classes=config.num_classes,
                   classes=tuple(str(c) for c in classes) if isinstance(classes, list | tuple) else None,
                   channels=int(shape[0]) if shape else len(config.mean),
                   image_size=(int(shape[1]), int(shape[2])) if shape else None)

    def check(self, classes: Sequence[str] | None, image_shape: Sequence[int] | None, *,
              model: str = "the model", data: str = "the data set") -> None:
        """Raise if data with these class names (label order) and image shape (C, H, W) is not
        what the model was trained on; ``None`` skips that part."""
        fix = "evaluate it on the data set it was trained on (--dataset, --data-dir)"
        if classes is not None:
            classes = tuple(str(c) for c in classes)
            if len(classes) != self.num_classes:
                raise GradshieldError(
                    f"{model} has {self.num_classes} classes but {data} has {len(classes)} "
                    f"{_names(classes)}; {fix}")
            if self.classes is not None and classes != self.classes:
                reordered = (" (the same names in another order: its label i would be read as "
                             "another class)" if sorted(classes) == sorted(self.classes) else "")
                raise GradshieldError(
                    f"{model} was trained on the classes {_names(self.classes)} but {data} has "
                    f"the classes {_names(classes)}{reordered}; its accuracy there would mean "
                    f"nothing. {fix[0].upper()}{fix[1:]}")
        if image_shape is not None:
            c, h, w = (int(v) for v in image_shape)
            if self.channels is not None and c != self.channels:
                raise GradshieldError(
                    f"{model} was trained on {self.channels}-channel images but {data} has "
                    f"{c}-channel images; {fix}")
            if self.image_size is not None and (h, w) != self.image_size:
                th, tw = self.image_size
                raise GradshieldError(
                    f"{model} was trained on {th}x{tw} images but {data} has {h}x{w} images; "
                    f"{fix}, or resize the images to {th}x{tw} (an image folder: --dataset folder "
                    f"--image-size {th} {tw}, or load_dataset(..., image_size=({th}, {tw})))")


def data_identity(model: nn.Module) -> DataIdentity | None:
    """The :class:`DataIdentity` a model loaded by :func:`load_model` carries (also through
    wrappers such as GCM's ``conceal`` or ``bpda``); None for a model built in Python."""
    for module in model.modules():
        identity = getattr(module, "data_identity", None)
        if isinstance(identity, DataIdentity):
            return identity
    return None


def load_model(path: str | os.PathLike, *, expect: ModelConfig | None = None
               ) -> tuple[NormalizedClassifier, dict]:
    """Rebuild the model stored in a checkpoint; returns (model in eval mode, checkpoint dict).

    The model's ``data_identity`` attribute (a :class:`DataIdentity`) records the classes and
    image shape it was trained on, checked by ``gradshield evaluate`` and
    :func:`gradshield.evaluation.run_suite`.
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
    try:
        identity = DataIdentity.from_checkpoint(blob, config)
    except (TypeError, ValueError, IndexError) as err:
        raise GradshieldError(f"checkpoint {path} has unreadable data metadata (classes/image_shape: "
                              f"{err}); re-save it with gradshield.checkpoint.save_checkpoint") from err
    model = build_model(config)
    load_weights(model, state, source=f"checkpoint {path}")
    model.data_identity = identity
    return model.eval(), blob
