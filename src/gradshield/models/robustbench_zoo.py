"""RobustBench's model zoo by name: ``robustbench:<dataset>/<threat_model>/<name>`` (the optional
extra ``gradshield[robustbench]``), e.g. ``robustbench:cifar10/Linf/Carmon2019Unlabeled``;
``robustbench:<name>`` means ``cifar10/Linf/<name>``, RobustBench's own defaults.

The architecture is RobustBench's; its weights come from a local file in RobustBench's
``model_dir`` layout, ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` (``weights`` is the
folder ``model_dir``, or the ``.pt`` file itself). ``robustbench.utils.load_model`` is never
called: it downloads a missing file (and timm-hosted entries from the hub), and unpickles without
``weights_only``. Here the file must exist, is read weights-only, and its state dict is adapted as
``load_model`` does it (``module.``/``model.`` prefixes). RobustBench models take [0, 1] images
and normalise inside themselves where they need it, so the wrapper's normalisation is the identity.

robustbench 1.1.1 on PyPI cannot be imported as a package (its ``__init__`` imports ``autoattack``,
which its dependency ``pyautoattack`` does not provide, and ``pkg_resources``, gone from
setuptools 82): only its model definitions and state-dict helpers are needed, and they are
imported without running that ``__init__`` (:func:`_zoo`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from gradshield.errors import GradshieldError
from gradshield.models.registry import Family, ModelConfig, register_family

INSTALL = "pip install 'gradshield[robustbench]' (or pip install robustbench)"
DATASETS = {"cifar10": (10, (32, 32)), "cifar100": (100, (32, 32)), "imagenet": (1000, (224, 224))}
THREAT_MODELS = ("Linf", "L2", "corruptions")


@functools.cache
def _zoo() -> SimpleNamespace:
    """robustbench's ``model_zoo`` (model definitions), ``enums`` and ``utils`` (state-dict helpers)."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        raise GradshieldError(f"RobustBench models need the robustbench package, which is not "
                              f"installed: {INSTALL}")
    stub = None
    if "robustbench" not in sys.modules:  # a package object without running its __init__
        stub = importlib.util.module_from_spec(spec)
        sys.modules["robustbench"] = stub
    try:
        zoo = importlib.import_module("robustbench.model_zoo")
        enums = importlib.import_module("robustbench.model_zoo.enums")
        utils = importlib.import_module("robustbench.utils")
    except ImportError as err:
        raise GradshieldError(f"robustbench is installed but its model zoo does not import ({err}); "
                              f"reinstall it: {INSTALL}") from err
    finally:
        if stub is not None and sys.modules.get("robustbench") is stub:
            del sys.modules["robustbench"]
    return SimpleNamespace(models=zoo.model_dicts, enums=enums, utils=utils)


def _parts(name: str) -> tuple[str, str, str]:
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["cifar10", "Linf", *parts]
    if len(parts) != 3 or not all(parts):
        raise GradshieldError(f"robustbench:{name} is not a RobustBench name; write "
                              "robustbench:<dataset>/<threat_model>/<name>, e.g. "
                              "robustbench:cifar10/Linf/Carmon2019Unlabeled")
    dataset, threat, model = parts
    if dataset not in DATASETS:
        raise GradshieldError(f"robustbench:{name}: unknown data set {dataset!r}; RobustBench has "
                              f"{', '.join(DATASETS)}")
    if threat not in THREAT_MODELS:
        raise GradshieldError(f"robustbench:{name}: unknown threat model {threat!r}; RobustBench "
                              f"has {', '.join(THREAT_MODELS)}")
    return dataset, threat, model


def _entry(name: str) -> tuple[str, str, str, dict]:
    import difflib

    dataset, threat, model = _parts(name)
    zoo = _zoo()
    table = zoo.models[zoo.enums.BenchmarkDataset(dataset)][zoo.enums.ThreatModel(threat)]
    if model not in table:
        close = difflib.get_close_matches(model, list(table), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GradshieldError(f"RobustBench has no model {model!r} for {dataset}/{threat}{hint}")
    if isinstance(table[model].get("gdrive_id"), list):
        raise GradshieldError(f"RobustBench's {model} is an ensemble of several files; gradshield "
                              "loads single-file RobustBench models only")
    return dataset, threat, model, table[model]


def canonical(name: str) -> str:
    return "/".join(_parts(name))


def defaults(name: str) -> dict:
    dataset, _, _, _ = _entry(name)
    classes, size = DATASETS[dataset]
    values = {"num_classes": classes, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
              "input_size": size}
    if dataset == "imagenet":  # RobustBench's ImageNet preprocessing ("Res256Crop224")
        values["preprocess"] = {"resize": 256, "interpolation": "bilinear"}
    return values


def build(name: str, config: ModelConfig) -> nn.Module:
    dataset, _, _, entry = _entry(name)
    if config.num_classes != DATASETS[dataset][0]:
        raise GradshieldError(f"robustbench:{canonical(name)} has {DATASETS[dataset][0]} classes, "
                              f"not {config.num_classes}")
    return entry["model"]()


def weights_file(name: str, weights: str | os.PathLike) -> Path:
    """The ``.pt`` file: ``weights`` itself, or ``<weights>/<dataset>/<threat_model>/<name>.pt``."""
    dataset, threat, model = _parts(name)
    path = Path(weights)
    if path.is_dir():
        path = path / dataset / threat / f"{model}.pt"
    if not path.is_file():
        raise GradshieldError(
            f"RobustBench weights not found: {path} (RobustBench's model_dir layout is "
            f"<model_dir>/{dataset}/{threat}/{model}.pt). gradshield never downloads: get the file "
            "once where there is internet, e.g. robustbench.utils.load_model("
            f"'{model}', model_dir='models', dataset='{dataset}', threat_model='{threat}'), and "
            "pass that model_dir (or the .pt file)")
    return path


def load(name: str, net: nn.Module, blob: object) -> None:
    """The file's state dict into ``net`` as ``robustbench.utils.load_model`` does it (its prefix
    handling and its tolerated mismatches, ``_safe_load_state_dict``)."""
    from gradshield.models.weights import state_dict_of

    dataset, _, model = _parts(name)
    zoo = _zoo()
    utils = zoo.utils
    if isinstance(blob, dict) and ("Kireev2021Effectiveness" in model
                                   or model == "Andriushchenko2020Understanding"):
        blob = blob.get("last", blob)
    inner = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    state = state_dict_of(inner, f"robustbench:{canonical(name)}")
    state = utils.rm_substr_from_state_dict(state, "module.")
    state = utils.rm_substr_from_state_dict(state, "model.")
    wanted = net.state_dict()
    if dataset == "imagenet" and any(k.startswith("model.") for k in wanted) \
            and not any(k in wanted for k in state):  # its normalising wrapper (load_model's rule)
        state = utils.add_substr_to_state_dict(state, "model.")
    utils._safe_load_state_dict(net, model, state, zoo.enums.BenchmarkDataset(dataset))


register_family(Family("robustbench", "RobustBench's model zoo, robustbench:<dataset>/<threat_model>"
                                      "/<name> (needs gradshield[robustbench]; local files in its "
                                      "model_dir layout)",
                       defaults=defaults, build=build, weights_file=weights_file, load=load,
                       canonical=canonical))
