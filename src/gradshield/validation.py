"""Early, explicit checks of what is handed to gradshield: images, labels and numbers.

One copy of each check; every failure is a GradshieldError that names the value and the fix.
"""

from __future__ import annotations

import math
import numbers

import torch

from gradshield.errors import GradshieldError


def check_images(x: torch.Tensor, *, name: str = "images") -> None:
    """Images must be a float NCHW tensor in [0, 1] with no NaN."""
    if not isinstance(x, torch.Tensor):
        raise GradshieldError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise GradshieldError(
            f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image"
        )
    if not x.is_floating_point():
        raise GradshieldError(
            f"{name} must be floating point in [0, 1], got dtype {x.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if x.numel() == 0:
        raise GradshieldError(f"{name} is empty (shape {tuple(x.shape)})")
    if torch.isnan(x).any():
        raise GradshieldError(f"{name} contain NaN values; clean the input before attacking")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise GradshieldError(
            f"{name} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; "
            "pass unnormalised pixels (divide uint8 by 255) — normalisation belongs inside the model"
        )


def check_labels(y: torch.Tensor, num_examples: int, num_classes: int | None = None,
                 *, name: str = "labels") -> None:
    """Labels must be an integer vector of length N with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise GradshieldError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != num_examples:
        raise GradshieldError(
            f"{name} must have shape ({num_examples},) to match the images, got {tuple(y.shape)}; "
            "pass one class index per image (y.view(-1); for one-hot labels y.argmax(1))"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise GradshieldError(f"{name} must be an integer tensor (torch.long), got {y.dtype}; "
                              "convert them with y.long()")
    if y.numel() and int(y.min()) < 0:
        raise GradshieldError(f"{name} must be class indices >= 0, found {int(y.min())}")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise GradshieldError(
            f"{name} must be < the number of classes ({num_classes}), found {int(y.max())}; "
            "check that the model and the data set have the same classes"
        )


# --------------------------------------------------------------------------- numbers


def check_number(value, name: str, *, positive: bool = False, where: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0 (> 0 with ``positive``); else a
    GradshieldError naming ``name`` (prefixed by ``where``, e.g. the suite entry)."""
    prefix = f"{where}: " if where else ""
    bound = "> 0" if positive else ">= 0"
    scalar = isinstance(value, torch.Tensor) and value.numel() == 1
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar):
        raise GradshieldError(f"{prefix}{name} must be a finite number {bound}, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise GradshieldError(f"{prefix}{name} must be a finite number {bound}, got {value!r}")
    return number


def check_int(value, name: str, *, minimum: int = 1, where: str = "") -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a bool is not); else a GradshieldError."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value \
            or value < minimum:
        raise GradshieldError(f"{prefix}{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_budget(value: float | torch.Tensor, name: str = "eps") -> float | torch.Tensor:
    """A budget: a finite number >= 0, or a float tensor of shape (N,) of them (per-example budgets)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise GradshieldError(f"{name} must be a float or a tensor of shape (N,), got shape "
                                  f"{tuple(value.shape)}")
        if not value.is_floating_point():
            value = value.float()
        if not torch.isfinite(value).all() or (value < 0).any():
            raise GradshieldError(f"{name} must be a finite number >= 0, got {value.tolist()}")
        return value
    return check_number(value, name)
