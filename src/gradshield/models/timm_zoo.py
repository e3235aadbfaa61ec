"""timm's models by name: ``timm:<name>[.<tag>]`` (the optional extra ``gradshield[timm]``).

The model's ``pretrained_cfg`` (for that tag) gives the classes, normalisation, input size and
evaluation transform (resize to ``floor(size / crop_pct)``, center crop, interpolation). The
network is built with ``pretrained=False`` (nothing is downloaded); weights come from a local
``.safetensors`` (never unpickled) or ``.pth`` file in timm's layout. A model whose input size is
fixed (ViT, DeiT, Swin) and asked for another ``input_size`` is built for that size.
"""

from __future__ import annotations

import difflib
import math

from torch import nn

from gradshield.errors import GradshieldError
from gradshield.models.registry import Family, ModelConfig, register_family

INSTALL = "pip install 'gradshield[timm]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError as err:
        raise GradshieldError(f"timm models need the timm package, which is not installed: "
                              f"{INSTALL}") from err
    return timm


def _pretrained_cfg(name: str):
    timm = _timm()
    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        names = timm.list_models()
        close = difflib.get_close_matches(arch, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GradshieldError(f"timm has no model {arch!r}{hint}; timm.list_models('*pattern*') "
                              f"lists them (timm {timm.__version__})")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise GradshieldError(f"timm's {arch} has no pretrained config {name!r}; "
                              f"timm.list_pretrained('{arch}*') lists its tags")
    return cfg


def defaults(name: str) -> dict:
    cfg = _pretrained_cfg(name)
    _, height, width = cfg.input_size
    crop_pct = cfg.crop_pct or 0.875
    return {"num_classes": int(cfg.num_classes or 1000), "mean": tuple(cfg.mean),
            "std": tuple(cfg.std), "input_size": (height, width),
            "preprocess": {"resize": math.floor(min(height, width) / crop_pct),
                           "interpolation": cfg.interpolation or "bicubic"}}


def build(name: str, config: ModelConfig) -> nn.Module:
    cfg = _pretrained_cfg(name)
    kwargs = dict(config.options)
    if cfg.fixed_input_size and tuple(config.input_size) != tuple(cfg.input_size[1:]):
        kwargs.setdefault("img_size", tuple(config.input_size))
    return _timm().create_model(name, pretrained=False, num_classes=config.num_classes, **kwargs)


register_family(Family("timm", "any timm model, timm:<name>[.<tag>] (needs gradshield[timm]; "
                                "local weights only)", defaults=defaults, build=build))
