"""torchvision's classification models by name: ``torchvision:<name>[.<WEIGHTS>]``.

``<name>`` is any of ``torchvision.models.list_models(module=torchvision.models)`` (e.g.
``resnet50``, ``wide_resnet50_2``, ``densenet121``, ``shufflenet_v2_x2_0``, ``efficientnet_b4``);
``<WEIGHTS>`` names the weights enum entry the file comes from (e.g. ``IMAGENET1K_V1``; default:
torchvision's ``DEFAULT``), whose metadata give the classes, normalisation and evaluation
transform (resize, center crop, interpolation). The network is built with ``weights=None``
(nothing is downloaded); the weights come from a local state dict file.
"""

from __future__ import annotations

import difflib

from torch import nn

from gradshield.errors import GradshieldError
from gradshield.models.registry import Family, ModelConfig, register_family


def _names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def _split(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    names = _names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GradshieldError(f"torchvision has no classification model {arch!r}{hint}; "
                              "torchvision.models.list_models(module=torchvision.models) lists them")
    return arch, tag or None


def _weights_entry(arch: str, tag: str | None):
    from torchvision import models

    enum = models.get_model_weights(arch)
    if tag is None:
        return enum.DEFAULT
    try:
        return enum[tag]
    except KeyError:
        raise GradshieldError(f"torchvision's {arch} has no weights {tag!r}; it has "
                              f"{', '.join(e.name for e in enum)}") from None


def defaults(name: str) -> dict:
    arch, tag = _split(name)
    entry = _weights_entry(arch, tag)
    transform = entry.transforms()  # metadata only: builds ImageClassification, downloads nothing
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    return {"num_classes": len(entry.meta["categories"]), "mean": tuple(transform.mean),
            "std": tuple(transform.std), "input_size": (crop, crop),
            "preprocess": {"resize": int(resize), "interpolation": transform.interpolation.value}}


def build(name: str, config: ModelConfig) -> nn.Module:
    from torchvision import models

    arch, _ = _split(name)
    return models.get_model(arch, weights=None, num_classes=config.num_classes, **config.options)


register_family(Family("torchvision", "any torchvision classification model, "
                                      "torchvision:<name>[.<WEIGHTS>] (local weights only)",
                       defaults=defaults, build=build))
