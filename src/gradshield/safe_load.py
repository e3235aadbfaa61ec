"""Reading ``.pt`` files a user hands in without ever running code from them.

Every such file (checkpoints, surrogates, weights files, cached data) is read with
``torch.load(..., weights_only=True)``: the unpickler rebuilds tensors and plain containers
(dicts, lists, tuples, strings, numbers) and refuses anything else before it runs, so a crafted
pickle asking for ``os.system`` gets an error, not a shell. Files that are not PyTorch files at
all (a web page saved by a failed download, a Git LFS pointer) are recognised from their first
bytes and named as such.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from gradshield.errors import GradshieldError

#: how many leading bytes are inspected to recognise a non-PyTorch file
HEAD_BYTES = 1024
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
#: the container types a gradshield file may hold besides tensors and scalars
PLAIN_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None), torch.Tensor, torch.Size,
               torch.dtype, torch.device)


class UnsafeFileError(GradshieldError):
    """A file refused because its pickle asks for Python objects beyond tensors and plain data."""


def describe_non_torch_file(head: bytes) -> str | None:
    """What a file starting with ``head`` is, if it is recognisably not a PyTorch file; else None.

    A PyTorch file starts with ``PK`` (zip) or a pickle opcode, never with ``<`` or text.
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(LFS_POINTER):
        return "a Git LFS pointer (a small text file standing in for the real one)"
    if text.startswith((b"<!doctype html", b"<html")) or (text.startswith(b"<") and b"<html" in text):
        return "a saved web page (HTML)"
    if text.startswith(b"<?xml") or text.startswith(b"<error"):
        return "a saved XML document (e.g. a server's error answer)"
    return None


def _refusal_detail(message: str) -> tuple[str, bool]:
    """(what torch's weights-only unpickler objected to, whether it asked for a Python object)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it asks for the Python object {found.group(1)}", True
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        return (f"it uses the pickle instruction {found.group(1)}, which tensors and plain data "
                "never need"), True
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else message[:200]), False


def load_torch_file(path: str | os.PathLike, *, what: str, remedy: str) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what is wrong.

    ``what`` names the file in messages ("checkpoint", "weights file"); ``remedy`` says how to get
    a good one. The caller checks that ``path`` exists. Raises :class:`UnsafeFileError` for a file
    asking for code or arbitrary Python objects (nothing in it runs), and
    :class:`~gradshield.errors.GradshieldError` for a web page, an LFS pointer, or a truncated or
    corrupt file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    kind = describe_non_torch_file(head)
    if kind is not None:
        fix = ("fetch the real file with `git lfs pull` (or download it directly)" if "LFS" in kind
               else "the download probably failed (a login, error or redirect page was saved "
                    "instead of the file); download it again and check that it finished")
        raise GradshieldError(f"{what} {path} is {kind}, not a PyTorch file: {fix}")
    if not head:
        raise GradshieldError(f"{what} {path} is empty (0 bytes); {remedy}")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise GradshieldError(f"{what} {path} is truncated or corrupt (its zip container is "
                              f"incomplete: the file ends early); {remedy}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads fine
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail, refused = _refusal_detail(str(err))
        if refused and "Weights only load failed" in str(err):
            raise UnsafeFileError(
                f"{what} {path} was refused: {detail}. gradshield reads files only as tensors and "
                "plain data (torch.load with weights_only=True), so nothing in the file ran; a file "
                "that asks for more was not written by gradshield, is corrupt, or was crafted to run "
                "code. Do not load it with weights_only=False unless you trust its source; "
                f"{remedy}") from None
        raise GradshieldError(
            f"{what} {path} is truncated or corrupt (UnpicklingError: {detail}); {remedy}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else "unexpected end of file"
        raise GradshieldError(
            f"{what} {path} is truncated or corrupt ({type(err).__name__}: {reason}); {remedy}"
        ) from err


def check_plain(value: object, where: str = "payload") -> None:
    """Raise if ``value`` holds anything a weights-only load would refuse (so a saved file can
    always be read back): only dicts, lists, tuples, strings, numbers, None and tensors."""
    if isinstance(value, dict):
        if type(value) not in (dict, collections.OrderedDict):  # e.g. a defaultdict needs its class
            raise GradshieldError(f"{where} is a {type(value).__name__}; store it as a plain dict")
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                raise GradshieldError(f"{where} has a key of type {type(key).__name__}; use str keys")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        if type(value) not in (list, tuple, torch.Size):  # a namedtuple needs its class to load
            raise GradshieldError(
                f"{where} is a {type(value).__name__}; store it as a plain tuple or dict")
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise GradshieldError(
            f"{where} is a {type(value).__name__}, which a weights-only load refuses; store it as "
            "plain data (str, numbers, lists, dicts, tensors), e.g. str(path) or dataclasses.asdict")
