"""Run an experiment: build (or train) its models, run each suite into its results file, compute
its analyses. Every step resumes: training from its epoch checkpoints, each results file from its
last finished batch, each analysis once stored.

The work folder (``--work-dir``, default ``<cache>/experiments/<name>``) holds::

    models/<model>/checkpoint.pt   models the experiment trains (and metrics.jsonl)
    runs/<run key>.db              one results file per (model, suite, through, examples, mode)
    crafted.db                     transfer adversarials, reused across target models
    analyses.db                    the analyses' stored outputs

Under torchrun (:mod:`gradshield.distributed`) every rank runs this same sequence: models are
trained data-parallel, each run's examples are sharded across the ranks
(:mod:`gradshield.evaluation.distributed`), and rank 0 alone writes the work folder's own files
and computes the analyses while the others wait. The work folder must be on a filesystem every
rank sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradshield import distributed
from gradshield.errors import GradshieldError
from gradshield.evaluation.experiment import Experiment, ModelSpec, RunSpec, budget
from gradshield.evaluation.suites import Suite

DEFAULT_BATCH = 250


@dataclass(frozen=True)
class Workspace:
    """Where an experiment keeps its models, results files and stored analyses."""

    root: Path

    def run_path(self, run: RunSpec) -> Path:
        return self.root / "runs" / f"{run.key}.db"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def crafted(self) -> Path:
        return self.root / "crafted.db"

    @property
    def analyses(self) -> Path:
        return self.root / "analyses.db"


def default_workspace(experiment: Experiment, work_dir: str | os.PathLike | None = None) -> Workspace:
    from gradshield.paths import cache_dir

    root = Path(work_dir) if work_dir is not None else cache_dir() / "experiments" / experiment.name
    return Workspace(root.expanduser().resolve())


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ExperimentData:
    """The evaluation examples: a seeded random subset of the test split, in random order (so the
    first k of them, which a run with ``examples = k`` uses, are a random subset too). Held in
    memory (``images``), or for a streamed data set (ImageNet) the files (``files``), preprocessed
    for each model as that model expects."""

    images: torch.Tensor | None     # float32 in [0, 1], (N, C, H, W); None when streamed
    labels: torch.Tensor
    classes: tuple[str, ...]
    order: torch.Tensor             # their indices in the test split
    info: dict
    train: object = field(repr=False, default=None)  # the ImageData training split
    test: object = field(repr=False, default=None)   # the whole ImageData test split
    files: object = field(repr=False, default=None)  # FileExamples of a streamed data set

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def _count(self, k: int | None) -> int:
        if k is not None and k > self.size:
            raise GradshieldError(f"a run asks for {k} examples but the experiment's data has "
                                  f"{self.size}; raise [data] examples")
        return self.size if k is None else k

    def examples(self, k: int | None, model: nn.Module | None = None):
        """The first ``k`` (all if None) as :class:`gradshield.data.Examples`; a streamed data set
        is preprocessed as ``model`` expects (its config's input size and resize)."""
        from gradshield.data import TensorExamples, preprocess_for

        k = self._count(k)
        if self.files is None:
            return TensorExamples(self.images[:k], self.labels[:k], self.classes)
        config = getattr(model, "config", None) or getattr(_undefended(model), "config", None)
        if config is None:
            raise GradshieldError("a streamed data set needs a model with a config (input size, "
                                  "preprocessing) to preprocess its images")
        return self.files.ordered(torch.arange(k)).with_preprocess(preprocess_for(config))

    def first(self, k: int | None, model: nn.Module | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``k`` as tensors (a streamed data set: decoded now, preprocessed for ``model``)."""
        from gradshield.data import take

        examples = self.examples(k, model)
        return take(examples, 0, len(examples)), examples.labels


def _undefended(model):
    from gradshield.attacks.adaptive import undefended

    return undefended(model) if model is not None else None


def _order(experiment: Experiment, labels: torch.Tensor, dataset: str, split: str
           ) -> tuple[torch.Tensor, dict]:
    """The evaluation subset's indices in random order, and how they were chosen."""
    from gradshield.data import per_class_index

    total, seed = labels.shape[0], experiment.seed
    pool, how = torch.arange(total), f"len({split})"
    per_class = experiment.data.get("per_class")
    if per_class is not None:
        pool = per_class_index(labels, per_class, seed)
        how = f"per_class_index(labels, {per_class}, seed={seed})"
    n = experiment.examples or len(pool)
    if n > len(pool):
        raise GradshieldError(f"[data] examples = {n} but the {dataset} {split} split has "
                              f"{len(pool)} (to choose from)")
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
    return order, {"dataset": dataset, "split": split, "examples": n,
                   "subset": f"{how}, permuted by torch.randperm(seed={seed}), first {n}"}


def experiment_data(experiment: Experiment, data_dir=None, cache_dir=None) -> ExperimentData:
    from gradshield.data import STREAMED, Preprocess, image_folder_split, load_dataset
    from gradshield.paths import data_dir as default_data_dir

    dataset = experiment.data.get("dataset", "cifar10")
    if dataset in STREAMED:
        files = image_folder_split(default_data_dir(data_dir), "val", Preprocess(), name=dataset)
        order, info = _order(experiment, files.labels, dataset, "val")
        files = files.ordered(order)
        info["preprocess"] = "each model's own (input size, resize, interpolation)"
        return ExperimentData(None, files.labels, files.classes, order, info, files=files)
    train, test = load_dataset(dataset, data_dir, cache_dir)
    order, info = _order(experiment, test.labels, dataset, "test")
    images = test.images[order].float().div_(255.0)
    return ExperimentData(images, test.labels[order], tuple(test.classes), order, info, train, test)


# --------------------------------------------------------------------------- models


def _train_config(spec: dict, seed: int):
    from gradshield.training import PRESETS, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if spec.get("preset") is not None and spec["preset"] not in PRESETS:
        raise GradshieldError(f"unknown training preset {spec['preset']!r}; choose one of "
                              f"{sorted(PRESETS)}")
    values = dict(PRESETS.get(spec.get("preset"), {}))
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()
                   if k in fields})
    values.setdefault("seed", seed)
    config = TrainConfig(**values)
    config.validate()
    return config


def _recipe(spec: dict, where: str):
    from gradshield.defenses.recipes import make_recipe
    from gradshield.training import preset_options

    defense = spec.get("defense", "standard")
    options = preset_options(spec.get("preset"), defense)  # the spec's options win
    for key, value in spec.get("options", {}).items():  # "3/255" budgets as in suites
        options[key] = budget(value, f"{where} option {key}") if isinstance(value, str) \
            and "/" in value else value
    return make_recipe(defense, **options)


def train_model(spec: ModelSpec, experiment: Experiment, workspace: Workspace, data: ExperimentData,
                *, progress: bool = False, device: torch.device | None = None) -> Path:
    """Train (or resume, or find finished) a model of the experiment on ``device`` (default: the
    CPU); returns its checkpoint."""
    from gradshield.models import create_model
    from gradshield.training import CHECKPOINT_NAME, train

    where = f"model {spec.name!r}"
    config = _train_config(spec.train, experiment.seed)
    recipe = _recipe(spec.train, where)
    run_dir = workspace.model_dir(spec.name)
    ckpt = run_dir / CHECKPOINT_NAME
    train_data = data.train.subset(spec.train.get("train_limit"), seed=config.seed)
    torch.manual_seed(config.seed)
    model = create_model(spec.train["model"], num_classes=len(data.classes),
                         width=float(spec.train.get("width", 1.0)),
                         input_size=tuple(train_data.image_shape[1:]),
                         tta=spec.train.get("tta", "")).to(device or "cpu")
    if ckpt.is_file():  # finished already? (train() itself refuses a checkpoint of other settings)
        from gradshield.checkpoint import read_checkpoint
        from gradshield.training import config_fingerprint

        blob = read_checkpoint(ckpt)
        if blob.get("fingerprint") != config_fingerprint(model, config, recipe, len(train_data)):
            raise GradshieldError(
                f"{run_dir} holds model {spec.name!r} trained with other settings (or by another "
                "gradshield version); delete that folder to retrain it, or pass another --work-dir")
        if blob.get("epoch", -1) + 1 >= config.epochs:
            return ckpt
    test_data = data.test if spec.train.get("eval_test", False) else None
    if distributed.current().main:
        print(f"[{experiment.name}] training {spec.name}: {recipe.describe()}", file=sys.stderr,
              flush=True)
    train(model, train_data, test_data, config, run_dir, recipe=recipe, progress=progress,
          extra_metadata={"experiment": experiment.name, "model_name": spec.name,
                          "dataset": experiment.data.get("dataset"),
                          "train_limit": spec.train.get("train_limit")})
    return ckpt


class Models:
    """The experiment's models by name, built once per process (trained or loaded as needed)."""

    def __init__(self, experiment: Experiment, workspace: Workspace, data: ExperimentData, *,
                 device: torch.device, progress: bool = False,
                 weights_dir: str | os.PathLike | None = None) -> None:
        self.experiment, self.workspace, self.data = experiment, workspace, data
        self.device, self.progress = device, progress
        self.weights_dir = Path(weights_dir).expanduser() if weights_dir is not None else None
        self._built: dict[str, nn.Module] = {}

    def weights(self, spec: ModelSpec) -> Path:
        """A ``weights`` path: absolute as given; relative to ``--weights-dir`` when given, else to
        the experiment file's folder (where it exists there), else to the working directory."""
        path = Path(spec.weights).expanduser()
        if path.is_absolute():
            return path
        if self.weights_dir is not None:
            return self.weights_dir / path
        if self.experiment.path is not None and (self.experiment.path.parent / path).exists():
            return self.experiment.path.parent / path
        return path

    def checkpoint(self, name: str) -> Path | None:
        spec = self.experiment.models[name]
        while spec.base is not None:
            spec = self.experiment.models[spec.base]
        if spec.model is not None:
            return self.weights(spec)
        if spec.checkpoint is not None:
            path = Path(spec.checkpoint)
            if not path.is_absolute() and self.experiment.path is not None and \
                    (self.experiment.path.parent / path).is_file():
                path = self.experiment.path.parent / path
            return path
        return self.workspace.model_dir(spec.name) / "checkpoint.pt"

    def __call__(self, name: str) -> nn.Module:
        if name not in self._built:
            self._built[name] = self._build(self.experiment.models[name]).to(self.device).eval()
        return self._built[name]

    def _build(self, spec: ModelSpec) -> nn.Module:
        from gradshield.checkpoint import load_model

        if spec.base is not None:
            from gradshield.defenses.concealment import ConcealmentWarning, conceal

            with warnings.catch_warnings():  # stacked placements: reported by the analyses
                warnings.simplefilter("ignore", ConcealmentWarning)
                return conceal(self(spec.base), at=spec.gcm["at"], w=spec.gcm["w"],
                               eps=spec.gcm["eps"])
        if spec.model is not None:
            from gradshield.models import create_model

            classes = None if spec.model.startswith("robustbench:") else len(self.data.classes)
            size = {"input_size": spec.input_size} if spec.input_size else {}
            return create_model(spec.model, num_classes=classes, weights=self.weights(spec), **size)
        if spec.train is not None:
            train_model(spec, self.experiment, self.workspace, self.data, progress=self.progress,
                        device=self.device)
        model, _ = load_model(self.checkpoint(spec.name))
        shape = None if self.data.images is None else tuple(self.data.images.shape[1:])
        model.data_identity.check(self.data.classes, shape, model=f"model {spec.name!r}",
                                  data="the experiment's data set")
        return model


# --------------------------------------------------------------------------- runs


def run_suite_of(experiment: Experiment, run: RunSpec) -> Suite:
    """The run's suite, with every entry sent through ``run.through`` when the run asks."""
    suite = experiment.suite(run.suite)
    if run.through is None:
        return suite
    kind = {"bpda": "bpda", "transfer": "transfer"}[run.through]
    specs = tuple(dataclasses.replace(s, through=run.through, kind=kind) for s in suite.attacks)
    return dataclasses.replace(suite, name=f"{suite.name} (through {run.through})", attacks=specs)


def execute_run(run: RunSpec, experiment: Experiment, workspace: Workspace, data: ExperimentData,
                models: Models, *, progress: str = "bar", command: str = "") -> dict:
    """One results file of the experiment (resumes); returns its summary."""
    from gradshield.evaluation.runner import run_suite

    model = models(run.model)
    surrogate = models(run.surrogate) if run.surrogate else None
    examples = data.examples(run.examples, model)
    checkpoint = models.checkpoint(run.model)
    spec = experiment.models[run.model]
    info = {"command": command, "experiment": experiment.name, "model_name": run.model,
            "model_spec": spec.describe(), "checkpoint": str(checkpoint),
            "defense": (f"GCM at {spec.gcm['at']} (w={spec.gcm['w']:g}, eps={spec.gcm['eps']:g})"
                        if spec.gcm else None),
            "through": run.through, "surrogate_name": run.surrogate,
            "data": {**data.info, "examples_used": len(examples)}}
    return run_suite(model, examples, None, run_suite_of(experiment, run),
                     workspace.run_path(run), seed=experiment.seed, batch_size=run.batch_size,
                     mode=run.mode, classes=data.classes, surrogate=surrogate,
                     samples_per_attack=run.samples, info=info, progress=progress,
                     crafted=workspace.crafted, gradient_figure=False)


def run_experiment(experiment: Experiment, workspace: Workspace, *, data_dir=None, cache_dir=None,
                   device: str = "cpu", progress: str = "bar", only: list[str] | None = None,
                   command: str = "", weights_dir: str | os.PathLike | None = None) -> dict:
    """Everything the experiment declares: the models it trains, then its runs, then its analyses
    (each in file order). ``only``: just these models (and what they need). ``weights_dir``: where
    relative ``weights = "..."`` paths of models by name are. Returns {run key: summary}."""
    from gradshield.evaluation.analyses import execute_analysis

    context = distributed.current()
    data = experiment_data(experiment, data_dir, cache_dir)
    torch_device = distributed.local_device(device, context)
    models = Models(experiment, workspace, data, device=torch_device,
                    progress=progress == "bar" and context.main, weights_dir=weights_dir)
    wanted = set(experiment.expand(only, "--only")) if only else None
    summaries = {}
    if context.main:
        workspace.root.mkdir(parents=True, exist_ok=True)
        (workspace.root / "experiment.toml").write_text(experiment.source)
        (workspace.root / "data.json").write_text(json.dumps({**data.info,
                                                              "classes": list(data.classes)}))
    distributed.check_shared_folder(workspace.root, context, "the experiment's work folder")
    for name, spec in experiment.models.items():
        if spec.train is not None and (wanted is None or name in wanted):
            train_model(spec, experiment, workspace, data, progress=progress == "bar" and context.main,
                        device=torch_device)
    for run in experiment.runs:
        if wanted is not None and run.model not in wanted:
            continue
        if context.main:
            print(f"[{experiment.name}] {run.key}", file=sys.stderr, flush=True)
        summaries[run.key] = execute_run(run, experiment, workspace, data, models,
                                         progress=progress, command=command)
    for entry in experiment.analyses:
        names = experiment.expand(entry.get("models", []), "analysis")
        if wanted is not None and not set(names) & wanted:
            continue
        if context.main:  # one process computes and stores the analyses
            print(f"[{experiment.name}] analysis {entry['id']}", file=sys.stderr, flush=True)
            execute_analysis(entry, experiment, workspace, data, models)
    distributed.barrier(context)
    return summaries


def experiment_classes(experiment: Experiment, workspace: Workspace) -> tuple[str, ...]:
    """The class names of the experiment's data, as stored when it ran."""
    path = workspace.root / "data.json"
    if path.is_file():
        return tuple(json.loads(path.read_text())["classes"])
    return ()


def store_command(workspace: Workspace, command: str) -> None:
    """Remember the command that runs the experiment (the report names it)."""
    workspace.root.mkdir(parents=True, exist_ok=True)
    (workspace.root / "command.txt").write_text(command + "\n")


def stored_command(workspace: Workspace) -> str | None:
    path = workspace.root / "command.txt"
    return path.read_text().strip() if path.is_file() else None
