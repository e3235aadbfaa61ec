"""Models by name, and the [0, 1]-input classifier wrapper.

One namespace: gradshield's own architectures by plain name (``compact``, ``resnet18``), and
models of other libraries as ``<library>:<name>`` (``torchvision:resnet50``,
``timm:deit_small_patch16_224``, ``robustbench:cifar10/Linf/Carmon2019Unlabeled``), each library a
:class:`Family`. A :class:`ModelConfig` holds everything needed to rebuild a model (it is stored in
checkpoints), so ``evaluate`` needs only the checkpoint file. Nothing is ever downloaded: weights
come from a local file (``create_model(..., weights=PATH)``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, tuple[Builder, str]] = {}
_FAMILIES: dict[str, Family] = {}


def register_model(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(num_classes, width, **options) -> nn.Module`` under ``name``."""

    def add(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise GradshieldError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = (builder, description or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return add


def list_models() -> dict[str, str]:
    """gradshield's own architecture names, and ``<library>:NAME`` for each model library, with
    one-line descriptions."""
    own = {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}
    return {**own, **{f"{f.prefix}:NAME": f.description for f in _FAMILIES.values()}}


@dataclass(frozen=True)
class Family:
    """Models of another library, named ``<prefix>:<name>``.

    ``defaults(name)``: the :class:`ModelConfig` fields the model's own config gives (classes,
    mean/std, input size, preprocessing), never touching the network; it also checks the name.
    ``build(name, config)``: the network with fresh weights (never downloads).
    ``weights_file(name, weights)``: the file to read for ``weights`` (a file, or a folder in the
    library's own layout). ``load(name, net, blob)``: put a loaded file's contents into the
    network as the library does (raises RuntimeError when they do not fit; default: the file's
    state dict, strictly). ``canonical(name)``: the name as stored (e.g. with defaults filled in).
    """

    prefix: str
    description: str
    defaults: Callable[[str], dict]
    build: Callable[[str, ModelConfig], nn.Module]
    weights_file: Callable[[str, str | os.PathLike], os.PathLike] = lambda name, weights: weights
    load: Callable[[str, nn.Module, object], None] | None = None
    canonical: Callable[[str], str] = lambda name: name


def register_family(family: Family) -> Family:
    """Add a library of models under ``family.prefix``."""
    if family.prefix in _FAMILIES:
        raise GradshieldError(f"a model family {family.prefix!r} is already registered")
    _FAMILIES[family.prefix] = family
    return family


def split_name(arch: str) -> tuple[Family | None, str]:
    """(the family, the name inside it) of ``<prefix>:<name>``; (None, arch) for gradshield's own."""
    prefix, sep, name = arch.partition(":")
    if not sep:
        if arch.startswith("tv-"):
            raise GradshieldError(f"the model names tv-<name> are now torchvision:<name>; use "
                                  f"'torchvision:{arch[3:]}'")
        return None, arch
    if prefix not in _FAMILIES:
        raise GradshieldError(f"unknown model library {prefix!r} in {arch!r}; use one of "
                              f"{', '.join(f + ':NAME' for f in sorted(_FAMILIES))}, or a gradshield "
                              f"architecture ({', '.join(sorted(_REGISTRY))})")
    if not name:
        raise GradshieldError(f"{arch!r} names no model; write {prefix}:<name>")
    return _FAMILIES[prefix], name


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild a model: architecture, classes, width, normalisation, options.

    ``input_size`` (H, W) in pixels; ``preprocess``: how a larger image is brought to it for
    evaluation, from the model's own config where it has one (``resize``: the shorter side in
    pixels before the center crop to ``input_size``; ``interpolation``: ``bilinear`` or
    ``bicubic``); empty: resize straight to ``input_size``.
    ``tta``: test-time augmentation in eval mode (see :func:`test_time_augmented`): "" (none),
    "flip" or "flip-translate"; every attack then attacks the augmented model. Training mode
    always runs the bare network.
    """

    arch: str
    num_classes: int = 10
    width: float = 1.0
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    input_size: tuple[int, int] = (32, 32)
    options: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=dict)
    tta: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("preprocess", "tta"):  # added later: absent when empty, so older fingerprints hold
            if not data[key]:
                del data[key]
        return data

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

    def extra_repr(self) -> str:
        # in the repr, so results files (fingerprinted by repr and weights) tell TTA models apart
        return f"tta={self.config.tta}" if self.config.tta else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        return self.net(x) if self.training else test_time_augmented(self.net, x, self.config.tta)


TTA_MODES = ("", "flip", "flip-translate")


def check_tta(tta: str) -> None:
    """A clear error unless ``tta`` is one of :data:`TTA_MODES`."""
    if tta not in TTA_MODES:
        raise GradshieldError(f"tta must be '' (none), 'flip' or 'flip-translate', got {tta!r}")


def _mirror_mean(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (net(x) + net(x.flip(3))) / 2


def test_time_augmented(net: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """``net``'s logits averaged over views of ``x`` (N, C, H, W). "": ``x`` alone. ``flip``: the
    image and its horizontal mirror (2 passes). ``flip-translate`` (airbench94's, ``tta_level=2`` in the
    authors' ``airbench94.py``; Jordan 2024): half that mean, plus a quarter each of the same mean
    for the image shifted diagonally by one pixel either way, the border reflected (6 passes)."""
    check_tta(tta)
    if not tta:
        return net(x)
    if tta == "flip":
        return _mirror_mean(net, x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (_mirror_mean(net, padded[..., :h, :w]) + _mirror_mean(net, padded[..., 2:, 2:])) / 2
    return (_mirror_mean(net, x) + shifted) / 2


def build_model(config: ModelConfig) -> NormalizedClassifier:
    """Build a freshly initialised model from its config (never downloads weights)."""
    family, name = split_name(config.arch)
    if family is None and config.arch not in _REGISTRY:
        close = difflib.get_close_matches(config.arch, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GradshieldError(
            f"unknown model {config.arch!r}{hint}; available: {', '.join(sorted(_REGISTRY))}, or "
            f"{', '.join(f + ':NAME' for f in sorted(_FAMILIES))}")
    if config.num_classes < 2:
        raise GradshieldError(f"num_classes must be >= 2, got {config.num_classes}")
    if config.width <= 0:
        raise GradshieldError(f"width multiplier must be > 0, got {config.width}")
    check_tta(config.tta)
    if len(config.mean) != len(config.std) or any(s <= 0 for s in config.std):
        raise GradshieldError(f"bad normalisation mean={config.mean} std={config.std}")
    if family is not None:
        if config.width != 1.0:
            raise GradshieldError(f"{config.arch} has a fixed width; pass width=1.0")
        net = family.build(name, config)
    else:
        builder, _ = _REGISTRY[config.arch]
        net = builder(num_classes=config.num_classes, width=config.width, **config.options)
    return NormalizedClassifier(net, config)


def model_config(arch: str, num_classes: int | None = None, width: float = 1.0, **kwargs
                 ) -> ModelConfig:
    """The config of a model by name: the model's own settings (a library model's classes,
    normalisation, input size and preprocessing; 10 classes and CIFAR-10 statistics for
    gradshield's architectures), overridden by what is given."""
    family, name = split_name(arch)
    if family is None:
        values = {"num_classes": 10}
    else:
        values = family.defaults(name)
        arch = f"{family.prefix}:{family.canonical(name)}"
    given = {k: tuple(v) if k in ("mean", "std", "input_size") else v for k, v in kwargs.items()}
    resize = values.get("preprocess", {}).get("resize")
    if "input_size" in given and "preprocess" not in given and resize is not None:
        old, new = min(values["input_size"]), min(given["input_size"])  # the resize scales along
        values["preprocess"] = {**values["preprocess"],
                                "resize": max(max(given["input_size"]), round(resize * new / old))}
    values.update(given)
    if num_classes is not None:
        values["num_classes"] = num_classes
    return ModelConfig(arch=arch, width=width, **values)


def create_model(arch: str, num_classes: int | None = None, width: float = 1.0, *,
                 weights: str | os.PathLike | None = None, **kwargs) -> NormalizedClassifier:
    """A model by name that takes [0, 1] images (its normalisation inside), fresh weights or
    ``weights`` read from a local file (see :func:`model_config` for the defaults).

    ``weights``: a state dict of the network (``.pth``/``.pt``/``.bin``, read weights-only, or
    ``.safetensors``, never unpickled); for ``robustbench:`` models also RobustBench's
    ``model_dir`` (the file ``<model_dir>/<dataset>/<threat_model>/<name>.pt``).
    """
    model = build_model(model_config(arch, num_classes, width, **kwargs))
    if weights is not None:
        load_model_weights(model, weights)
    return model


def load_model_weights(model: NormalizedClassifier, weights: str | os.PathLike) -> None:
    """Read ``weights`` (see :func:`create_model`) into ``model.net``, with a clear error for a
    missing, foreign, unsafe or mismatched file."""
    from gradshield.models.weights import load_into, read_weights

    family, name = split_name(model.config.arch)
    path = family.weights_file(name, weights) if family is not None else weights
    load = None
    if family is not None and family.load is not None:
        load = lambda net, blob: family.load(name, net, blob)
    load_into(model.net, read_weights(path), path=path, arch=model.config.arch,
              num_classes=model.config.num_classes, load=load)


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier (at least 1)."""
    return max(1, round(channels * width))
