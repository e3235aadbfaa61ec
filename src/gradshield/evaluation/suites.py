"""Attack suites: TOML files that list attacks with their budgets, parsed and checked up front.

A suite file::

    name = "my-suite"
    description = "what it measures"

    [defaults]              # optional: merged into every entry whose attack takes the key
    steps = 20

    [[attack]]
    attack = "pgd"          # a registered attack (gradshield.attacks.registered())
    norm = "linf"
    eps = "8/255"           # [0, 1] pixel scale; "a/b" strings allowed
    label = "8/255"         # budget label for tables and curves (default: the eps as written)
    steps = 10              # any keyword of the attack function (the contract vocabulary)

Reserved keys of an entry: ``attack``, ``id`` (unique name, default built from attack/norm/label),
``family`` (the metric family a curve is drawn over, default from the attack and norm), ``label``,
``kind`` (for the gradient-masking diagnostics), ``through`` (``"model"``, ``"bpda"``: gradients
through GCM replaced by the identity, ``"transfer"``: crafted on a surrogate) and ``surrogate``.

Budget units:

- additive attacks: ``eps`` on the [0, 1] pixel scale (``"8/255"`` is accepted), or
  ``eps_imagenet``: a budget stated for 224x224x3 ImageNet images, converted to the evaluated
  image size by :func:`convert_imagenet_budget` (L-inf unchanged, L2 times sqrt(d/d_ref), L1 times
  d/d_ref, with d = C*H*W: the per-coordinate size of the perturbation is kept);
- flow attacks: ``eps`` in pixels, or ``eps_normalized`` in grid_sample units (the FGR paper's),
  converted with :func:`gradshield.warp.normalized_to_pixels` (0.01 at 32 px = 0.155 px).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import inspect
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gradshield.attacks.registry import KINDS, AttackInfo, attack_info, registered
from gradshield.compat import tomllib
from gradshield.errors import GradshieldError
from gradshield.validation import check_int, check_number

#: Image size the ``eps_imagenet`` budgets refer to (C, H, W).
IMAGENET_SHAPE = (3, 224, 224)
RESERVED = ("attack", "id", "family", "label", "kind", "through", "surrogate", "eps",
            "eps_imagenet", "eps_normalized")
THROUGH = ("model", "bpda", "transfer")
SUITE_KEYS = ("name", "description", "notes", "defaults", "attack")


def attack_function(name: str) -> Callable:
    """The function behind a registered attack name (:mod:`gradshield.attacks.registry`)."""
    return attack_info(name).function


# --------------------------------------------------------------------------- budgets


_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def parse_budget(value, where: str) -> float:
    """A budget from TOML: a number or an ``"a/b"`` string; finite and >= 0."""
    if isinstance(value, bool):
        raise GradshieldError(f"{where}: budget must be a number or a string like '8/255', got {value}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        match = _FRACTION.match(value)
        try:
            number = float(match.group(1)) / float(match.group(2)) if match else float(value)
        except (ValueError, ZeroDivisionError):
            number = float("nan")
        if not math.isfinite(number):
            raise GradshieldError(f"{where}: cannot read the budget {value!r}; write a number (0.03) "
                                  "or a fraction of pixel levels ('8/255')")
    else:
        raise GradshieldError(f"{where}: budget must be a number or a string like '8/255', "
                              f"got {type(value).__name__}")
    check_number(number, "budget", where=where)
    return number


def convert_imagenet_budget(eps: float, norm: str, image_shape: tuple[int, int, int]) -> float:
    """A 224x224x3 budget carried to ``image_shape`` keeping the per-coordinate perturbation size:
    L-inf unchanged, L2 times sqrt(d / d_ref), L1 times d / d_ref (d = C*H*W)."""
    ratio = math.prod(image_shape) / math.prod(IMAGENET_SHAPE)
    return {"linf": eps, "l2": eps * math.sqrt(ratio), "l1": eps * ratio}[norm]


# --------------------------------------------------------------------------- entries and suites


@dataclass(frozen=True)
class AttackSpec:
    """One checked suite entry. ``budget``: eps in the attack's units before size-dependent
    conversion (see ``unit``); ``hyper``: the remaining keyword arguments of the attack function."""

    id: str
    attack: str
    family: str
    norm: str
    label: str
    kind: str
    through: str
    budget: float | None
    unit: str             # "pixel-scale", "imagenet-pixel-scale", "pixels", "normalized" or "none"
    hyper: dict = field(default_factory=dict)
    surrogate: str = "base"

    def eps_for(self, image_shape: tuple[int, int, int]) -> float | None:
        """The ``eps`` passed to the attack for images of shape (C, H, W)."""
        if self.budget is None:
            return None
        if self.unit == "imagenet-pixel-scale":
            return convert_imagenet_budget(self.budget, self.norm, image_shape)
        if self.unit == "normalized":
            from gradshield.warp import normalized_to_pixels

            if image_shape[1] != image_shape[2]:
                raise GradshieldError(
                    f"attack {self.id!r}: eps_normalized needs square images, got {image_shape}; "
                    "give eps in pixels instead")
            return float(normalized_to_pixels(self.budget, image_shape[-1]))
        return self.budget

    def kwargs_for(self, image_shape: tuple[int, int, int]) -> dict:
        """Keyword arguments for the attack function (``eps`` converted, ``norm`` where it takes one)."""
        kwargs = dict(self.hyper)
        info = attack_info(self.attack)
        eps = self.eps_for(image_shape)
        if eps is not None and info.bounded:
            kwargs["eps"] = eps
        if info.fixed_norm is None:
            kwargs["norm"] = self.norm
        return kwargs

    def threshold_for(self, image_shape: tuple[int, int, int]) -> float | None:
        """For a minimum-size attack (no ``eps`` argument) given a budget: success counts only
        where the perturbation size is within it. None otherwise."""
        if self.budget is None or attack_info(self.attack).bounded:
            return None
        return self.eps_for(image_shape)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    attacks: tuple[AttackSpec, ...]
    source: str           # the TOML text
    origin: str           # file path or "builtin:<name>"

    @property
    def digest(self) -> str:
        """sha256 of the checked content (not of comments or layout)."""
        blob = json.dumps([a.to_dict() for a in self.attacks], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _check_hyper(attack: str, info: AttackInfo, hyper: dict, where: str) -> None:
    params = inspect.signature(info.function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
               and n not in ("eps", "norm", "generator", "targeted", "labels")]
    for key in hyper:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed + list(RESERVED), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise GradshieldError(
                f"{where}: unknown key {key!r} for attack {attack!r}; {hint}"
                f"its settings are {allowed}, plus the entry keys {list(RESERVED)}")


def _applicable(defaults: dict, attack) -> dict:
    """The [defaults] keys the attack function takes (all of them for an unknown attack, which
    is then reported by name)."""
    if attack not in registered():
        return dict(defaults)
    params = inspect.signature(attack_info(attack).function).parameters
    return {k: v for k, v in defaults.items() if k in params or k in RESERVED or k == "norm"}


def _default_family(info: AttackInfo, norm: str, has_budget: bool) -> str:
    if info.space == "flow":
        return f"flow-{norm}"
    if not info.bounded and not has_budget:
        return f"min-{norm}"
    return norm


def parse_attack(entry: dict, defaults: dict, where: str) -> AttackSpec:
    """Check one ``[[attack]]`` table (merged over ``defaults``) and return its :class:`AttackSpec`."""
    if not isinstance(entry, dict):
        raise GradshieldError(f"{where}: each [[attack]] must be a table, got {type(entry).__name__}")
    merged = {**_applicable(defaults, entry.get("attack")), **entry}
    if "attack" not in merged:
        raise GradshieldError(f"{where}: missing 'attack = \"<name>\"'; choose one of {sorted(registered())}")
    name = merged.pop("attack")
    try:
        info = attack_info(name)
    except GradshieldError as err:
        raise GradshieldError(f"{where}: {err}") from None
    norm = merged.pop("norm", info.norms[0])
    if info.fixed_norm is not None and norm != info.fixed_norm:
        raise GradshieldError(f"{where}: attack {name!r} is {info.fixed_norm} only, got norm = {norm!r}")
    if norm not in info.norms:
        raise GradshieldError(f"{where}: unknown norm {norm!r} for {name}; choose one of {info.norms}")
    budgets = [k for k in ("eps", "eps_imagenet", "eps_normalized") if k in merged]
    if len(budgets) > 1:
        raise GradshieldError(f"{where}: give one of {budgets}, not several")
    if budgets:
        key = budgets[0]
        if key == "eps_imagenet" and info.space != "additive":
            raise GradshieldError(f"{where}: eps_imagenet is for additive attacks; {name} is {info.space}")
        if key == "eps_normalized" and info.space != "flow":
            raise GradshieldError(f"{where}: eps_normalized is for flow attacks; use eps for {name}")
        raw = merged.pop(key)
        budget = parse_budget(raw, f"{where} ({key})")
        unit = {"eps": "pixels" if info.space == "flow" else "pixel-scale",
                "eps_imagenet": "imagenet-pixel-scale", "eps_normalized": "normalized"}[key]
    elif not info.bounded:
        raw, budget, unit = None, None, "none"
    else:
        units = ("pixels, or eps_normalized" if info.space == "flow"
                 else "[0, 1] pixel scale, e.g. '8/255', or eps_imagenet")
        raise GradshieldError(f"{where}: attack {name!r} needs a budget: eps = ... ({units})")
    through = merged.pop("through", "model")
    if through not in THROUGH:
        raise GradshieldError(f"{where}: through = {through!r}; choose one of {THROUGH}")
    kind = merged.pop("kind", {"bpda": "bpda", "transfer": "transfer"}.get(through, info.kind))
    if kind not in KINDS:
        raise GradshieldError(f"{where}: kind = {kind!r}; choose one of {KINDS}")
    surrogate = str(merged.pop("surrogate", "base"))
    if surrogate != "base" and through != "transfer":
        raise GradshieldError(f"{where}: surrogate is only used with through = \"transfer\"")
    label = str(merged.pop("label", raw if raw is not None else "min-norm"))
    family = str(merged.pop("family", _default_family(info, norm, budget is not None)))
    ident = str(merged.pop("id", "-".join(
        [name, norm, label] + ([through] if through != "model" else []))))
    for key in ("steps", "restarts", "max_queries", "n_target_classes"):
        if key in merged:
            check_int(merged[key], key, where=where)
    for key in ("step_size", "rel_step_size"):
        if key in merged:
            merged[key] = parse_budget(merged[key], f"{where} ({key})")
    _check_hyper(name, info, merged, where)
    return AttackSpec(id=ident, attack=name, family=family, norm=norm, label=label, kind=kind,
                      through=through, budget=budget, unit=unit, hyper=merged, surrogate=surrogate)


def parse_suite(text: str, origin: str = "<string>") -> Suite:
    """Parse and check a suite from TOML text; every problem is a GradshieldError naming the entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GradshieldError(f"suite {origin} is not valid TOML: {err}") from err
    unknown = [k for k in data if k not in SUITE_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SUITE_KEYS, n=1)
        raise GradshieldError(
            f"suite {origin}: unknown top-level key {unknown[0]!r}"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}; allowed: {list(SUITE_KEYS)}. "
            "Attack settings belong inside an [[attack]] table")
    entries = data.get("attack", [])
    if not isinstance(entries, list) or not entries:
        raise GradshieldError(f"suite {origin} lists no attacks; add at least one [[attack]] table")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise GradshieldError(f"suite {origin}: [defaults] must be a table")
    specs = [parse_attack(e, defaults, f"suite {origin}, attack #{i + 1}")
             for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.id in seen:
            raise GradshieldError(
                f"suite {origin}: attacks #{seen[spec.id] + 1} and #{i + 1} share the id {spec.id!r}; "
                "give one of them id = \"...\" (or a different label)")
        seen[spec.id] = i
    name = str(data.get("name") or Path(origin).stem)
    return Suite(name, str(data.get("description", "")), tuple(specs), text, origin)


def builtin_suites() -> dict[str, str]:
    """Names of the suites shipped with gradshield and their descriptions."""
    out = {}
    for path in sorted(importlib.resources.files("gradshield").joinpath("suites").iterdir()):
        if path.name.endswith(".toml"):
            out[path.name[:-5]] = tomllib.loads(path.read_text()).get("description", "")
    return out


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """A built-in suite by name (``gcm-paper``, ``fgr-paper``, ``adaptive``...) or a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise GradshieldError(f"suite file not found: {path}")
        return parse_suite(path.read_text(), str(path))
    builtin = importlib.resources.files("gradshield").joinpath("suites", f"{name_or_path}.toml")
    if not builtin.is_file():
        raise GradshieldError(f"no built-in suite {str(name_or_path)!r} and no such file; built-in "
                              f"suites: {sorted(builtin_suites())}")
    return parse_suite(builtin.read_text(), f"builtin:{name_or_path}")
