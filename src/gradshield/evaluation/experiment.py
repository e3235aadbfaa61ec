"""Experiment files: which models, which variants of them, which data, which suites, and what the
report shows (tables, figures, claims), declared in one TOML file and checked up front.

An experiment file (see ``experiments/*.toml`` for complete ones)::

    name = "gcm-cifar10"
    title = "GCM on CIFAR-10"
    seed = 0                                  # the data subset, attack randomness, training
    [data]
    dataset = "cifar10"                       # as ``--dataset``
    examples = 1000                           # a seeded random subset of the test split
    # per_class = 20                          # or: that many of each class (GCM paper's C&W)
    [models.vanilla]                          # a model: a checkpoint, or a training recipe
    train = { model = "compact", epochs = 20 }
    [models.deit-s]                           # or a model by name with a local weights file
    model = "timm:deit_small_patch16_224"
    weights = "deit_small_patch16_224.safetensors"   # relative: to --weights-dir
    [variants.gcm-front]                      # a model with an inference-time defense
    base = "vanilla"
    gcm = { at = "front" }
    [[grid]]                                  # a family of variants (or models) in one table
    name = "gcm-w{w:g}"
    kind = "variants"
    base = "vanilla"
    gcm = { at = "front", eps = 1e-8 }
    vary = { "gcm.w" = [1e10, 1e20] }
    [[runs]]                                  # models x one suite -> one results file each
    models = ["vanilla", "gcm-front"]
    suite = "gcm-paper"
    through = "bpda"                          # optional: run every entry through BPDA/transfer
    examples = 500                            # the first 500 of the data subset (default: all)
    [[analyses]]                              # computed from models (gradshield.evaluation.analyses)
    [[claims]]                                # tested from stored results (...evaluation.claims)
    [[report]]                                # the report's blocks, in order (...experiment_report)

Names of models, variants and grids are shared; a grid name in a list stands for all its members.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from gradshield.compat import tomllib
from gradshield.errors import GradshieldError
from gradshield.evaluation.store import MODES
from gradshield.evaluation.suites import THROUGH, Suite, load_suite, parse_budget

TOP_KEYS = ("name", "title", "description", "seed", "data", "models", "variants", "grid", "runs",
            "analyses", "claims", "report")
TRAIN_KEYS = ("model", "width", "defense", "options", "preset", "epochs", "batch_size", "lr",
              "momentum", "nesterov", "weight_decay", "warmup_epochs", "schedule", "milestones",
              "gamma", "amp", "augment", "train_limit", "seed", "eval_test", "tta", "lookahead",
              "bias_lr_scale", "crop_padding", "flip")
GCM_KEYS = ("at", "w", "eps")
METRICS = ("ar", "robust", "success", "clean")


def _fail(where: str, message: str) -> GradshieldError:
    return GradshieldError(f"{where}: {message}")


def _check_keys(table: dict, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(table, dict):
        raise _fail(where, f"must be a table, got {type(table).__name__}")
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(where, f"unknown key {key!r}{hint}; allowed: {list(allowed)}")


def _list(value, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise _fail(where, f"must be a name or a list of names, got {type(value).__name__}")
    return list(value)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """A model of the experiment: a checkpoint file, a training recipe, a model by name with a
    weights file (``model``, ``weights``: ``torchvision:``/``timm:``/``robustbench:`` names, see
    :func:`gradshield.models.create_model`), or a variant of another model (``base``) with an
    inference-time defense (``gcm``: GCM placement ``at``, ``w``, ``eps``)."""

    name: str
    checkpoint: str | None = None
    model: str | None = None
    weights: str | None = None
    input_size: tuple[int, int] | None = None  # with model: instead of the model's own
    train: dict | None = None
    base: str | None = None
    gcm: dict | None = None
    grid: str | None = None          # the grid this member came from
    params: dict = field(default_factory=dict)  # the grid values of this member

    @property
    def is_variant(self) -> bool:
        return self.base is not None

    def describe(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


@dataclass(frozen=True)
class RunSpec:
    """One suite on one model: a results file."""

    model: str
    suite: str                       # as written: a built-in name or a path (resolved)
    through: str | None = None       # run every entry through "bpda" or "transfer"
    examples: int | None = None      # the first k of the data subset
    mode: str = "per-attack"
    batch_size: int = 250
    surrogate: str | None = None     # a model name for through = "transfer" / transfer entries
    samples: int = 4

    @property
    def key(self) -> str:
        """The results file's stem: unique per (model, suite, through, examples, mode)."""
        suite = Path(self.suite).stem if self.suite.endswith(".toml") else self.suite
        parts = [self.model, suite]
        if self.through:
            parts.append(self.through)
        if self.examples is not None:
            parts.append(f"n{self.examples}")
        if self.mode != "per-attack":
            parts.append(self.mode)
        if self.surrogate:
            parts.append(f"from-{self.surrogate}")
        return "__".join(parts)


@dataclass(frozen=True)
class Experiment:
    """A checked experiment file; ``path`` is where it was read (suites resolve beside it)."""

    name: str
    title: str
    description: str
    seed: int
    data: dict
    models: dict[str, ModelSpec]
    grids: dict[str, list[str]]
    runs: tuple[RunSpec, ...]
    analyses: tuple[dict, ...]
    claims: tuple[dict, ...]
    report: tuple[dict, ...]
    source: str
    path: Path | None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def examples(self) -> int | None:
        return self.data.get("examples")

    def suite(self, name: str) -> Suite:
        """A suite by built-in name or by a path relative to the experiment file."""
        if name.endswith(".toml") and self.path is not None and not Path(name).is_absolute():
            candidate = self.path.parent / name
            if candidate.is_file():
                return load_suite(candidate)
        return load_suite(name)

    def expand(self, names, where: str) -> list[str]:
        """Model names, with grid names replaced by their members; unknown names are errors."""
        out = []
        for name in _list(names, where):
            if name in self.grids:
                out.extend(self.grids[name])
            elif name in self.models:
                out.append(name)
            else:
                known = sorted({*self.models, *self.grids})
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _fail(where, f"unknown model {name!r}{hint}; models and grids: {known}")
        return out

    def runs_of(self, model: str) -> list[RunSpec]:
        return [r for r in self.runs if r.model == model]


# --------------------------------------------------------------------------- parsing


def _train_spec(train: dict, where: str) -> dict:
    _check_keys(train, TRAIN_KEYS, where)
    if "model" not in train:
        raise _fail(where, "needs model = \"<architecture>\" (see `gradshield models`)")
    options = train.get("options", {})
    if not isinstance(options, dict):
        raise _fail(where, "options must be a table of the defense's options")
    return copy.deepcopy(train)


def _gcm_spec(gcm: dict, where: str) -> dict:
    _check_keys(gcm, GCM_KEYS, where)
    out = {"at": gcm.get("at", "front"), "w": float(gcm.get("w", 1e20)),
           "eps": float(gcm.get("eps", 1e-8))}
    if not isinstance(out["at"], str | list):
        raise _fail(where, "at must be 'front', 'all' or a list of module names")
    return out


def _model_spec(name: str, table: dict, where: str, *, grid: str | None = None,
                params: dict | None = None) -> ModelSpec:
    if not isinstance(table, dict):
        raise _fail(where, f"must be a table, got {type(table).__name__}")
    sources = [k for k in ("checkpoint", "train", "base", "model") if k in table]
    if len(sources) != 1:
        raise _fail(where, "give exactly one of checkpoint = \"FILE\", train = {...}, "
                           "model = \"<library>:<name>\" (with weights = \"FILE\") or "
                           f"base = \"<model>\" (got {sources or 'none'})")
    allowed = ("checkpoint", "train", "base", "gcm", "model", "weights", "input_size")
    _check_keys(table, allowed, where)
    if ("model" in table) != ("weights" in table):
        raise _fail(where, "model = \"<library>:<name>\" needs weights = \"FILE\" (a local "
                           "weights file; gradshield never downloads) and weights needs model")
    size = table.get("input_size")
    if size is not None and ("model" not in table or not isinstance(size, list) or len(size) != 2
                             or not all(isinstance(v, int) and v > 0 for v in size)):
        raise _fail(where, "input_size = [H, W] (pixels) goes with model = \"...\"")
    if "model" in table:
        from gradshield.models import split_name

        try:
            split_name(str(table["model"]))
        except GradshieldError as err:
            raise _fail(where, str(err)) from None
    if "gcm" in table and "base" not in table:
        raise _fail(where, "gcm = {...} is a variant of another model: add base = \"<model>\"")
    if "base" in table and "gcm" not in table:
        raise _fail(where, "a variant needs gcm = {at = ..., w = ..., eps = ...}")
    return ModelSpec(
        name=name, checkpoint=str(table["checkpoint"]) if "checkpoint" in table else None,
        model=str(table["model"]) if "model" in table else None,
        weights=str(table["weights"]) if "weights" in table else None,
        input_size=tuple(size) if size is not None else None,
        train=_train_spec(table["train"], f"{where}.train") if "train" in table else None,
        base=str(table["base"]) if "base" in table else None,
        gcm=_gcm_spec(table["gcm"], f"{where}.gcm") if "gcm" in table else None,
        grid=grid, params=dict(params or {}))


def _set_path(table: dict, dotted: str, value, where: str) -> None:
    keys = dotted.split(".")
    node = table
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise _fail(where, f"cannot set {dotted!r}: {key!r} is not a table")
    node[keys[-1]] = value


def _expand_grid(entry: dict, where: str) -> tuple[str, list[tuple[str, dict, dict]]]:
    """A [[grid]] table -> (grid name, [(member name, model table, params)])."""
    if not isinstance(entry, dict):
        raise _fail(where, "each [[grid]] must be a table")
    entry = copy.deepcopy(entry)
    template = entry.pop("name", None)
    kind = entry.pop("kind", "variants")
    vary = entry.pop("vary", None)
    label = entry.pop("id", None)
    if not template or "{" not in str(template):
        raise _fail(where, "needs name = \"...{key}...\", a template naming each member by its "
                           "varied values, e.g. \"gcm-w{w:g}\"")
    if kind not in ("variants", "models"):
        raise _fail(where, f"kind must be 'variants' or 'models', got {kind!r}")
    if not isinstance(vary, dict) or not vary:
        raise _fail(where, "needs vary = { \"dotted.key\" = [values...] }")
    axes = [(k, _list(v, f"{where}.vary.{k}")) for k, v in vary.items()]
    members = []
    for values in itertools.product(*[v for _, v in axes]):
        table = copy.deepcopy(entry)
        params = {}
        for (dotted, _), value in zip(axes, values, strict=True):
            _set_path(table, dotted, value, where)
            params[dotted.split(".")[-1]] = value
        try:
            member = str(template).format(**params)
        except (KeyError, ValueError, IndexError) as err:
            raise _fail(where, f"name template {template!r} does not fit the varied keys "
                               f"{list(params)}: {err}") from err
        members.append((member, table, params))
    names = [m for m, _, _ in members]
    if len(set(names)) != len(names):
        raise _fail(where, f"the name template {template!r} gives duplicate names {names}")
    return str(label or template), members


def _positive_int(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, f"{key} must be an integer >= 1, got {value!r}")
    return value


def _run_specs(entry: dict, experiment_models: dict, grids: dict, where: str) -> list[RunSpec]:
    _check_keys(entry, ("models", "suite", "through", "examples", "mode", "batch_size",
                        "surrogate", "samples"), where)
    if "suite" not in entry or "models" not in entry:
        raise _fail(where, "needs models = [...] and suite = \"<suite>\"")
    through = entry.get("through")
    if through is not None and through not in THROUGH[1:]:
        raise _fail(where, f"through must be one of {THROUGH[1:]} (or absent), got {through!r}")
    mode = entry.get("mode", "per-attack")
    if mode not in MODES:
        raise _fail(where, f"mode must be one of {MODES}, got {mode!r}")
    examples = entry.get("examples")
    if examples is not None:
        examples = _positive_int(examples, where, "examples")
    batch_size = _positive_int(entry.get("batch_size", 250), where, "batch_size")
    samples = entry.get("samples", 4)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise _fail(where, f"samples must be an integer >= 0, got {samples!r}")
    surrogate = entry.get("surrogate")
    if surrogate is not None and surrogate not in experiment_models:
        raise _fail(where, f"surrogate {surrogate!r} is not a model of this experiment")
    names = []
    for name in _list(entry["models"], f"{where}.models"):
        if name in grids:
            names.extend(grids[name])
        elif name in experiment_models:
            names.append(name)
        else:
            known = sorted({*experiment_models, *grids})
            raise _fail(where, f"unknown model {name!r}; models and grids: {known}")
    return [RunSpec(model=m, suite=str(entry["suite"]), through=through, examples=examples,
                    mode=mode, batch_size=batch_size, surrogate=surrogate, samples=samples)
            for m in names]


def parse_experiment(text: str, path: str | os.PathLike | None = None) -> Experiment:
    """Parse and check an experiment (TOML text); every problem is a GradshieldError."""
    origin = str(path) if path is not None else "<string>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise GradshieldError(f"experiment {origin} is not valid TOML: {err}") from err
    _check_keys(data, TOP_KEYS, f"experiment {origin}")
    if not data.get("name"):
        raise _fail(f"experiment {origin}", "needs name = \"...\" (it names the output files)")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(f"experiment {origin}", f"seed must be an integer, got {seed!r}")
    data_table = data.get("data", {})
    _check_keys(data_table, ("dataset", "examples", "split", "per_class"),
                f"experiment {origin} [data]")
    if data_table.get("split", "test") != "test":
        raise _fail(f"experiment {origin} [data]", "only split = \"test\" is evaluated")
    for key in ("examples", "per_class"):
        if key in data_table:
            _positive_int(data_table[key], f"experiment {origin} [data]", key)
    models: dict[str, ModelSpec] = {}
    grids: dict[str, list[str]] = {}

    def add(name: str, spec: ModelSpec, where: str) -> None:
        if name in models or name in grids:
            raise _fail(where, f"the name {name!r} is used twice")
        models[name] = spec

    for section in ("models", "variants"):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise _fail(f"experiment {origin}", f"[{section}.<name>] tables expected")
        for name, entry in table.items():
            where = f"experiment {origin} [{section}.{name}]"
            spec = _model_spec(name, entry, where)
            if section == "variants" and not spec.is_variant:
                raise _fail(where, "a variant needs base = \"<model>\" and gcm = {...}")
            if section == "models" and spec.is_variant:
                raise _fail(where, "put models with base = ... under [variants.<name>]")
            add(name, spec, where)
    for i, entry in enumerate(data.get("grid", [])):
        where = f"experiment {origin} [[grid]] #{i + 1}"
        grid_name, members = _expand_grid(entry, where)
        if grid_name in models or grid_name in grids:
            raise _fail(where, f"the name {grid_name!r} is used twice")
        for member, table, params in members:
            add(member, _model_spec(member, table, f"{where} ({member})", grid=grid_name,
                                    params=params), where)
        grids[grid_name] = [m for m, _, _ in members]
    for name, spec in models.items():  # variants of known models, no cycles
        seen = {name}
        while spec.base is not None:
            if spec.base not in models:
                raise _fail(f"experiment {origin} ({name})", f"base model {spec.base!r} is not "
                                                            "defined")
            if spec.base in seen:
                raise _fail(f"experiment {origin} ({name})", "variants form a cycle")
            seen.add(spec.base)
            spec = models[spec.base]
    runs: list[RunSpec] = []
    for i, entry in enumerate(data.get("runs", [])):
        runs.extend(_run_specs(entry, models, grids, f"experiment {origin} [[runs]] #{i + 1}"))
    keys = [r.key for r in runs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise _fail(f"experiment {origin}", f"runs listed twice: {duplicated}")
    experiment = Experiment(
        name=str(data["name"]), title=str(data.get("title", data["name"])),
        description=str(data.get("description", "")), seed=seed,
        data={"dataset": data_table.get("dataset", "cifar10"),
              **{k: data_table[k] for k in ("examples", "per_class") if k in data_table}},
        models=models, grids=grids, runs=tuple(runs),
        analyses=tuple(data.get("analyses", [])), claims=tuple(data.get("claims", [])),
        report=tuple(data.get("report", [])), source=text,
        path=Path(path) if path is not None else None)
    for run in experiment.runs:  # suites exist and parse
        experiment.suite(run.suite)
    from gradshield.evaluation.analyses import check_analysis
    from gradshield.evaluation.claims import check_claim
    from gradshield.evaluation.experiment_report import check_block

    ids = [a.get("id") for a in experiment.analyses if isinstance(a, dict)]
    for i, entry in enumerate(experiment.analyses):
        check_analysis(experiment, entry, f"experiment {origin} [[analyses]] #{i + 1}")
    if len(set(ids)) != len(ids):
        raise _fail(f"experiment {origin}", f"analysis ids must be unique, got {ids}")
    claim_ids = [c.get("id") for c in experiment.claims if isinstance(c, dict)]
    for i, entry in enumerate(experiment.claims):
        check_claim(experiment, entry, f"experiment {origin} [[claims]] #{i + 1}")
    if len(set(claim_ids)) != len(claim_ids):
        raise _fail(f"experiment {origin}", f"claim ids must be unique, got {claim_ids}")
    for i, entry in enumerate(experiment.report):
        check_block(experiment, entry, f"experiment {origin} [[report]] #{i + 1}")
    return experiment


def load_experiment(path: str | os.PathLike) -> Experiment:
    """An experiment file; a name without ``.toml`` is looked up in ``experiments/``."""
    path = Path(path)
    if not path.is_file() and path.suffix != ".toml":
        candidate = Path("experiments") / f"{path}.toml"
        if candidate.is_file():
            path = candidate
    if not path.is_file():
        raise GradshieldError(f"experiment file not found: {path}; pass a .toml file (see "
                              "experiments/ in the gradshield repository)")
    return parse_experiment(path.read_text(), path)


def budget(value, where: str) -> float:
    """A number or an 'a/b' fraction (as in suites)."""
    return parse_budget(value, where)
