"""A registry of architectures by name, and the [0, 1]-input classifier wrapper.

A :class:`ModelConfig` holds everything needed to rebuild a model (it is stored in checkpoints),
so ``evaluate`` needs only the checkpoint file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from gradshield.errors import GradshieldError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register_model(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, width, **options) -> nn.Module`` under ``name``."""

    def add(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise GradshieldError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = (builder, description or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return add


def list_models() -> dict[str, str]:
    """Registered architecture names and one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild a model: architecture, classes, width, normalisation, options."""

    arch: str
    num_classes: int = 10
    width: float = 1.0
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    input_size: tuple[int, int] = (32, 32)
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        for key in ("mean", "std", "input_size"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on [0, 1] images; buffers, no parameters."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedClassifier(nn.Module):
    """``net(normalize(x))`` for x in [0, 1]; carries its :class:`ModelConfig` as ``.config``."""

    def __init__(self, net: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.normalize = Normalize(config.mean, config.std)
        self.net = net
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_model(config: ModelConfig) -> NormalizedClassifier:
    """Build a freshly initialised model from its config."""
    if config.arch not in _REGISTRY:
        raise GradshieldError(
            f"unknown model {config.arch!r}; available: {', '.join(sorted(_REGISTRY))}")
    if config.num_classes < 2:
        raise GradshieldError(f"num_classes must be >= 2, got {config.num_classes}")
    if config.width <= 0:
        raise GradshieldError(f"width multiplier must be > 0, got {config.width}")
    if len(config.mean) != len(config.std) or any(s <= 0 for s in config.std):
        raise GradshieldError(f"bad normalisation mean={config.mean} std={config.std}")
    builder, _ = _REGISTRY[config.arch]
    net = builder(num_classes=config.num_classes, width=config.width, **config.options)
    return NormalizedClassifier(net, config)


def create_model(arch: str, num_classes: int = 10, width: float = 1.0, **kwargs
                 ) -> NormalizedClassifier:
    """Shortcut: ``build_model(ModelConfig(arch, num_classes, width, ...))``."""
    return build_model(ModelConfig(arch=arch, num_classes=num_classes, width=width, **kwargs))


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 1)."""
    return max(1, round(channels * width))
