"""Training recipes: a recipe turns a batch into the loss the training loop minimises.

The loop (:func:`gradshield.training.train`) knows nothing of defenses; a new defense is a new
recipe. A recipe is a callable ``recipe(model, x, y, generator) -> scalar loss`` with a ``name``
and a ``describe()`` dict that is saved with the checkpoint. Randomness comes only from the
generator passed in (so a resumed epoch repeats exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError


class Recipe(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class StandardRecipe:
    """Cross-entropy on the clean batch (optionally with label smoothing)."""

    label_smoothing: float = 0.0
    name: str = "standard"

    def __call__(self, model, x, y, generator):
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def describe(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Callable[..., Recipe]] = {"standard": StandardRecipe}


def make_recipe(name: str, **options) -> Recipe:
    """Build a registered recipe by name with keyword options."""
    if name not in RECIPES:
        raise GradshieldError(f"unknown defense recipe {name!r}; choose one of {sorted(RECIPES)}")
    try:
        return RECIPES[name](**options)
    except TypeError as err:
        raise GradshieldError(f"bad options for recipe {name!r}: {err}") from err
