"""Weights files a user hands in: read without running code, unwrapped to a state dict, loaded
with an error that says what does not fit.

A ``.safetensors`` file is read by the ``safetensors`` package (a tensor table: never unpickled);
anything else (``.pth``, ``.pt``, ``.bin``) goes through :func:`gradshield.safe_load.load_torch_file`
(weights-only), which also names a saved web page or a Git LFS pointer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gradshield.errors import GradshieldError
from gradshield.safe_load import HEAD_BYTES, describe_non_torch_file, load_torch_file

#: keys under which training scripts keep the state dict inside a larger file
CONTAINER_KEYS = ("state_dict", "model")
REMEDY = "download or copy it again (gradshield never downloads weights)"


def _read_safetensors(path: Path) -> dict:
    with open(path, "rb") as handle:
        kind = describe_non_torch_file(handle.read(HEAD_BYTES))
    if kind is not None:
        raise GradshieldError(f"weights file {path} is {kind}, not a safetensors file: the download "
                              "probably failed; download it again and check that it finished")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise GradshieldError(f"reading {path} needs the safetensors package: pip install "
                              "'gradshield[timm]' (or pip install safetensors)") from err
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise GradshieldError(f"weights file {path} is not a readable safetensors file ({err}); "
                              f"{REMEDY}") from err


def read_weights(path: str | os.PathLike) -> object:
    """The contents of a weights file (a dict of tensors for ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise GradshieldError(f"weights file not found: {path}; check the path (gradshield never "
                              "downloads weights)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return load_torch_file(path, what="weights file", remedy=REMEDY)


def state_dict_of(blob: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself, or its ``state_dict``/``model`` entry;
    a ``module.`` prefix on every key (``DataParallel``/DDP) is removed."""
    if isinstance(blob, dict):
        for key in CONTAINER_KEYS:
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not blob or not all(
            isinstance(v, torch.Tensor) for v in blob.values()):
        what = (f"a dict with the keys {sorted(map(str, blob))[:6]}" if isinstance(blob, dict)
                else f"a {type(blob).__name__}")
        raise GradshieldError(f"weights file {path} holds {what}, not a state dict; save it with "
                              "torch.save(model.state_dict(), path) (or safetensors' save_file)")
    if all(k.startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def load_into(net: nn.Module, blob: object, *, path: str | os.PathLike, arch: str,
              num_classes: int, load: Callable[[nn.Module, object], None] | None = None) -> None:
    """Load a weights file's contents into ``net`` (strictly, or by ``load``), explaining a
    mismatch in one sentence."""
    try:
        if load is not None:
            load(net, blob)
        else:
            net.load_state_dict(state_dict_of(blob, path))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [repr(err)]
        detail = lines[1] if len(lines) > 1 else ""
        detail = detail if len(detail) < 240 else detail[:240] + "..."
        raise GradshieldError(
            f"could not load {path} into {arch}: {lines[0]} {detail} It must be a state dict of "
            f"{arch} with {num_classes} classes: is the file for another architecture, class "
            "count or input size?") from err
