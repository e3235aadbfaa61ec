"""The ``gradshield`` command line: a thin layer that parses options and calls the library.

Sub-commands: ``train``, ``evaluate``, ``quickstart``, ``models``. Run ``gradshield CMD --help``.
Started by torchrun (``torchrun --nproc-per-node=N -m gradshield train|evaluate|experiment ...``),
the command joins the process group first (docs/distributed.md) and rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gradshield import __version__, distributed, machine
from gradshield.errors import GradshieldError
from gradshield.models.registry import TTA_MODES

MAIN_HELP = """gradshield: gradient-based adversarial defenses (GCM, FGR) and their honest evaluation.

Images are [0, 1] pixels. Data: --data-dir (or $GRADSHIELD_DATA) must hold cifar10-jpeg.tar.gz
(the offline archive), torchvision's CIFAR folders, or an image folder (ImageNet: val/<wnid>/*.JPEG);
derived files go to --cache-dir (or $GRADSHIELD_CACHE, default ~/.cache/gradshield).

Several processes (GPUs, nodes): torchrun --nproc-per-node=N -m gradshield train|evaluate|experiment
... trains data-parallel (--batch-size is the global batch) or shards an evaluation's examples;
see docs/distributed.md."""
#: Sub-commands that run data-parallel when started by torchrun.
DISTRIBUTED_COMMANDS = ("train", "evaluate", "experiment")


def _add_data_options(parser: argparse.ArgumentParser, *, train: bool) -> None:
    group = parser.add_argument_group("data")
    from gradshield.data import DATASETS, STREAMED

    group.add_argument("--dataset", default="cifar10",
                       choices=DATASETS + (STREAMED if not train else ()),
                       help="data set; cifar10 uses <data-dir>/cifar10-jpeg.tar.gz when present, "
                            "else torchvision's CIFAR-10 under <data-dir> (cifar100: its "
                            "cifar-100-python folder); folder reads <data-dir>/train/<class>/* "
                            "and <data-dir>/test/<class>/*"
                            + ("" if train else "; imagenet streams <data-dir>/val/<wnid>/*.JPEG "
                               "batch by batch with the model's evaluation transform")
                            + " (default: %(default)s)")
    group.add_argument("--data-dir", default=None,
                       help="folder holding the data (default: $GRADSHIELD_DATA, else ./data)")
    group.add_argument("--cache-dir", default=None,
                       help="folder for decoded tensors (default: $GRADSHIELD_CACHE, "
                            "else ~/.cache/gradshield)")
    group.add_argument("--download", action="store_true",
                       help="let torchvision download CIFAR (needs internet; never done otherwise)")
    group.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="--dataset folder: resize every image to H x W pixels on load "
                            "(default: keep the size; all images must then share it); "
                            "--dataset imagenet: crop to H x W instead of the model's input size "
                            "(the resize scales with it)")
    if train:
        group.add_argument("--train-limit", type=int, default=None, metavar="N",
                           help="train on a random subset of N images, chosen by --seed "
                                "(default: all)")
    group.add_argument("--test-limit", type=int, default=None, metavar="N",
                       help="evaluate on a random subset of N test images, chosen by --seed "
                            "(default: all)")
    if not train:
        group.add_argument("--per-class", type=int, default=None, metavar="K",
                           help="evaluate on K test images of each class, chosen by --seed (the "
                                "GCM paper's C&W: 20 per category); with --test-limit, that many "
                                "of those (default: all)")
        group.add_argument("--workers", type=int, default=None, metavar="N",
                           help="--dataset imagenet: image decoding processes (default: the "
                                "usable cores, at most 8; 0 decodes in the main process)")


def image_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--image-size H W`` as a tuple (None when not given)."""
    size = getattr(args, "image_size", None)
    if size is None:
        return None
    if min(size) < 1:
        raise GradshieldError(f"--image-size needs two positive numbers H W, got {size}")
    return int(size[0]), int(size[1])


def _load_data(args: argparse.Namespace, *, subset: bool = True):
    from gradshield.data import load_dataset

    train, test = load_dataset(args.dataset, args.data_dir, args.cache_dir,
                               download=args.download, image_size=image_size(args))
    if not subset:
        return train, test
    train = train.subset(getattr(args, "train_limit", None), seed=args.seed)
    return train, test.subset(args.test_limit, seed=args.seed)


TTA_CHOICES = tuple(mode or "none" for mode in TTA_MODES)


def _tta(choice: str) -> str:
    """A ``--tta`` choice as the model config stores it ("none" is "")."""
    return "" if choice == "none" else choice


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from gradshield.models import list_models
    from gradshield.training import TrainConfig

    d = TrainConfig()
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="compact",
                       help=f"architecture: {', '.join(sorted(list_models()))} (`gradshield "
                            "models` describes them) (default: %(default)s, the 2-core CPU net)")
    model.add_argument("--width", type=float, default=1.0,
                       help="channel-width multiplier (default: %(default)s)")
    model.add_argument("--tta", choices=TTA_CHOICES, default="none",
                       help="test-time augmentation stored with the model: flip = the mean of the "
                            "logits of each image and its mirror in eval mode; flip-translate = "
                            "airbench94's 6 views (flips of the image and of its 1-pixel diagonal "
                            "shifts); evaluation and every attack then use it; the metrics also "
                            "record the bare accuracy")
    opt = parser.add_argument_group(
        "optimisation", "unset options take the --preset's value, else gradshield's default")
    from gradshield.training import PRESETS

    opt.add_argument("--preset", default=None, choices=sorted(PRESETS),
                     help="named settings: fgr-paper (the FGR paper, Sec. 5.1: 60 epochs, lr 0.1 "
                          "divided by 10 after 30 and 50, momentum 0.9, weight decay 5e-4, batch "
                          "128), fgr-code (the FGR authors' code: 80 epochs, lr 0.01 divided by "
                          "10 after 40 and 60, batch 128), speedrun (for --model speedrun: "
                          "airbench's optimiser at batch 512, 16 epochs, 2-pixel crops, "
                          "alternating flips, and label_smoothing=0.2 for the standard recipe; "
                          "see experiments/training-cifar10.toml)")
    opt.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {d.epochs})")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="images per optimiser step: the GLOBAL batch; under torchrun each of the "
                          f"N processes takes batch-size / N of it (default: {d.batch_size})")
    opt.add_argument("--lr", type=float, default=None,
                     help="peak learning rate of SGD for the global batch, reached after the "
                          "warm-up; not rescaled with the number of processes (default: "
                          f"{d.lr})")
    opt.add_argument("--schedule", default=None, choices=("linear", "step"),
                     help="after the warm-up: linear decay to 0, or step (lr x --gamma at each of "
                          f"--milestones) (default: {d.schedule})")
    opt.add_argument("--milestones", type=int, nargs="*", default=None, metavar="EPOCH",
                     help="epochs where a step schedule multiplies the lr by --gamma")
    opt.add_argument("--gamma", type=float, default=None,
                     help=f"step schedule's factor (default: {d.gamma})")
    opt.add_argument("--momentum", type=float, default=None, help=f"(default: {d.momentum})")
    opt.add_argument("--nesterov", default=None, action=argparse.BooleanOptionalAction,
                     help="Nesterov momentum (default: on)")
    opt.add_argument("--weight-decay", type=float, default=None,
                     help=f"L2 weight decay (default: {d.weight_decay})")
    opt.add_argument("--warmup-epochs", type=float, default=None,
                     help=f"linear LR warm-up length in epochs (default: {d.warmup_epochs})")
    opt.add_argument("--lookahead", default=None, action=argparse.BooleanOptionalAction,
                     help="airbench's Lookahead: a moving average of the weights every 5 steps, "
                          "which the weights reset to and the run ends on (default: off)")
    opt.add_argument("--bias-lr-scale", type=float, default=None,
                     help="learning-rate multiplier of 1-d parameters (biases, BatchNorm "
                          f"shifts), their weight decay divided by it (airbench: 64) (default: "
                          f"{d.bias_lr_scale})")
    opt.add_argument("--crop-padding", type=int, default=None,
                     help="pixels of zero padding before the random crop (airbench: 2) "
                          f"(default: {d.crop_padding})")
    opt.add_argument("--flip", default=None, choices=("random", "alternating"),
                     help="horizontal flips: random per image and epoch, or alternating (a "
                          "seeded half mirrored in even epochs, the other half in odd ones; "
                          f"airbench) (default: {d.flip})")
    opt.add_argument("--amp", default=None, choices=("auto", "bf16", "off"),
                     help="bfloat16 autocast for training: auto uses it where the CPU/GPU runs it "
                          f"natively (weights and evaluation stay float32) (default: {d.amp})")
    opt.add_argument("--no-augment", action="store_true",
                     help="disable the random crop (after --crop-padding pixels of zero padding) and the "
                          "horizontal flip")
    opt.add_argument("--seed", type=int, default=d.seed,
                     help="seed for initialisation, data order, augmentation and subsets "
                          "(default: %(default)s)")
    defense = parser.add_argument_group("defense (training recipe)")
    defense.add_argument("--defense", default="standard",
                         help="training recipe: standard, at, igr, fgr, adt, fgr_adt "
                              "(`gradshield defenses` lists each one's options and units) "
                              "(default: %(default)s)")
    defense.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE",
                         help="an option of the recipe, repeatable, e.g. --defense fgr "
                              "--defense-option lam=0.05")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/train",
                     help="run folder: checkpoint.pt (each epoch), metrics.jsonl "
                          "(default: %(default)s)")
    run.add_argument("--no-resume", action="store_true",
                     help="start over even if --out holds a checkpoint of the same run")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--device", default="cpu",
                     help="torch device, e.g. cuda (under torchrun: cuda is each process's GPU "
                          "LOCAL_RANK, with NCCL); --amp auto uses bfloat16 autocast on a GPU "
                          "(default: %(default)s)")


def parse_options(pairs: list[str], fields: dict[str, type]) -> dict:
    """``["lam=0.1", "steps=7"]`` -> typed keyword options, checked against ``fields``."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise GradshieldError(
                f"bad option {pair!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        kind = fields[key]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                options[key] = raw.lower() in ("true", "1")
            elif kind in (int, float, str):
                options[key] = kind(raw)
            else:  # e.g. "float | None"
                options[key] = None if raw.lower() == "none" else float(raw)
        except ValueError as err:
            raise GradshieldError(f"option {key} needs a {getattr(kind, '__name__', kind)}, "
                                  f"got {raw!r}") from err
    return options


def recipe_fields(name: str) -> dict[str, type]:
    """The settable options of a registered recipe (dataclass fields except its name)."""
    import dataclasses
    import typing

    from gradshield.defenses.recipes import RECIPES

    if name not in RECIPES:
        raise GradshieldError(f"unknown defense {name!r}; choose one of {sorted(RECIPES)}")
    factory = RECIPES[name]
    hints = typing.get_type_hints(factory)
    return {f.name: hints.get(f.name, float) for f in dataclasses.fields(factory)
            if f.name != "name"}


def _make_recipe(args: argparse.Namespace):
    from gradshield.defenses.recipes import make_recipe
    from gradshield.training import preset_options

    options = preset_options(args.preset, args.defense)  # the user's options win
    options.update(parse_options(args.defense_option, recipe_fields(args.defense)))
    return make_recipe(args.defense, **options)


def train_config(args: argparse.Namespace):
    """The TrainConfig of ``train``/``quickstart`` options: the preset, then the options given."""
    from gradshield.training import PRESETS, TrainConfig

    values = dict(PRESETS[args.preset]) if args.preset else {}
    for key in ("epochs", "batch_size", "lr", "schedule", "gamma", "momentum", "nesterov",
                "weight_decay", "warmup_epochs", "amp", "lookahead", "bias_lr_scale",
                "crop_padding", "flip"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    if args.milestones is not None:
        values["milestones"] = tuple(args.milestones)
    config = TrainConfig(**values, seed=args.seed, augment=not args.no_augment)
    config.validate()
    return config


def _train(args: argparse.Namespace):
    from gradshield.models import create_model
    from gradshield.training import train

    recipe = _make_recipe(args)  # bad options fail before the data loads
    device = torch_device(getattr(args, "device", "cpu"))
    train_data, test_data = _load_data(args)
    config = train_config(args)
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=train_data.num_classes, width=args.width,
                         input_size=tuple(train_data.image_shape[1:]),
                         tta=_tta(args.tta),
                         **dataset_normalization(args.dataset)).to(device)
    started = time.perf_counter()
    history = train(model, train_data, test_data, config, args.out, recipe=recipe,
                    resume=not args.no_resume, progress=not args.quiet,
                    extra_metadata={"command": " ".join(sys.argv), "dataset": args.dataset,
                                    "train_limit": args.train_limit})
    return model, history, time.perf_counter() - started


def torch_device(name: str) -> torch.device:
    """``--device`` as a torch.device, refusing a GPU torch cannot see; under torchrun a bare
    ``cuda`` is this process's GPU (``LOCAL_RANK``)."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GradshieldError(f"--device {name!r} is not a torch device; use cpu or cuda "
                              "(cuda:1 for the second GPU)") from err
    return distributed.local_device(device)


def dataset_normalization(dataset: str) -> dict:
    """mean/std for a model trained on ``dataset`` (CIFAR-100's own; else the model's default)."""
    from gradshield.models.registry import CIFAR100_MEAN, CIFAR100_STD

    return {"mean": CIFAR100_MEAN, "std": CIFAR100_STD} if dataset == "cifar100" else {}


def cmd_train(args: argparse.Namespace) -> int:
    _, history, seconds = _train(args)
    last = history[-1] if history else {}
    context = distributed.current()
    if context.main:
        print(json.dumps({"out": str(Path(args.out) / "checkpoint.pt"), "epochs": len(history),
                          "test_acc": last.get("test_acc"), "train_time_s": last.get("elapsed_s"),
                          "wall_time_this_call_s": round(seconds, 1),
                          "processes": context.world_size}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.suite:
        return evaluate_suite(args)
    if args.gcm:
        raise GradshieldError("--gcm needs --suite (e.g. --suite adaptive); clean accuracy "
                              "is unchanged by GCM by construction and is reported by every suite")
    from gradshield.metrics import predict

    model, described = load_evaluated_model(args)
    examples = evaluation_data(args, model)
    device = torch_device(args.device)
    model = model.to(device)
    starts = range(0, len(examples), args.batch_size)
    ranges = [(a, min(a + args.batch_size, len(examples))) for a in starts]
    correct = 0
    for (start, stop), x in zip(ranges, examples.batches(ranges), strict=True):
        pred = predict(model, x.to(device), args.batch_size).cpu()
        correct += int((pred == examples.labels[start:stop]).sum())
    result = {**described, "arch": model.config.arch, "tta": model.config.tta or "none",
              "examples": len(examples),
              "clean_accuracy": correct / len(examples), "seed": args.seed}
    if distributed.current().main:
        print(json.dumps(result))
    return 0


def load_evaluated_model(args: argparse.Namespace):
    """The model of ``evaluate``: a gradshield checkpoint (``--checkpoint``), or a model by name
    with local weights (``--model NAME --weights FILE``); returns (model, what to record)."""
    from gradshield.data import sha256_file

    if args.checkpoint:
        if args.model or args.weights:
            raise GradshieldError("give --checkpoint, or --model NAME --weights FILE, not both")
        from gradshield.checkpoint import load_model

        model, _ = load_model(args.checkpoint)
        return _with_tta(model, args), {"checkpoint": str(args.checkpoint)}
    if not args.model:
        raise GradshieldError("evaluate needs --checkpoint FILE (written by gradshield train) or "
                              "--model NAME --weights FILE (torchvision:NAME, timm:NAME, "
                              "robustbench:NAME)")
    from gradshield.models import create_model

    if args.weights is None:
        raise GradshieldError(f"--model {args.model} needs --weights FILE (a local weights file; "
                              "gradshield never downloads weights)")
    classes = None  # a RobustBench model has its data set's classes; others get the data's
    if not args.model.startswith("robustbench:"):
        if args.dataset == "imagenet":
            from gradshield.data import scan_split
            from gradshield.paths import data_dir

            classes = len(scan_split(data_dir(args.data_dir), "val")[2])
        else:
            classes = _load_data(args, subset=False)[1].num_classes
    options = {"input_size": image_size(args)} if image_size(args) else {}
    model = _with_tta(create_model(args.model, num_classes=classes, weights=args.weights,
                                   **options).eval(), args)
    weights = Path(args.weights)
    return model, {"model_name": model.config.arch, "weights": str(weights),
                   "weights_sha256": sha256_file(weights) if weights.is_file() else None}


def _with_tta(model, args: argparse.Namespace):
    """``model`` with the test-time augmentation of ``--tta`` instead of its own, if given."""
    if args.tta is None:
        return model
    import dataclasses

    model.config = dataclasses.replace(model.config, tta=_tta(args.tta))
    return model


def evaluation_data(args: argparse.Namespace, model):
    """The test examples of ``evaluate`` (checked against what a checkpoint was trained on):
    :class:`~gradshield.data.TensorExamples`, or streamed files for ``--dataset imagenet``."""
    from gradshield.checkpoint import data_identity
    from gradshield.data import TensorExamples, image_folder_split, preprocess_for
    from gradshield.paths import data_dir

    if args.dataset == "imagenet":
        config = getattr(model, "config", None)
        preprocess = preprocess_for(config, image_size(args))
        test = image_folder_split(data_dir(args.data_dir), "val", preprocess, name="imagenet",
                                  workers=args.workers)
    else:
        _, test = _load_data(args, subset=False)
    if args.per_class is not None:
        test = test.per_class(args.per_class, seed=args.seed)
    test = test.subset(args.test_limit, seed=args.seed)
    identity = data_identity(model)
    if identity is not None:
        identity.check(test.classes, test.image_shape, model=f"the checkpoint {args.checkpoint}",
                       data=f"the data set {args.dataset}")
    if args.dataset == "imagenet":
        return test
    x, y = test.as_float()
    description = {"dataset": args.dataset, "split": "test", "examples": len(test)}
    return TensorExamples(x, y, tuple(test.classes), description)


def _add_suite_options(parser: argparse.ArgumentParser) -> None:
    """Options of ``gradshield evaluate --suite``."""
    from gradshield.evaluation.store import MODES

    group = parser.add_argument_group("attack suite")
    group.add_argument("--suite", default=None,
                       help="built-in suite (gcm-paper, fgr-paper, adaptive, quickstart) or a suite .toml "
                            "file; its budgets are on the [0, 1] pixel scale for intensity "
                            "attacks (e.g. eps = \"8/255\") and in pixels for flow attacks")
    group.add_argument("--gcm", default=None, metavar="AT",
                       help="evaluate the checkpoint with GCM inserted: 'front', 'all' or "
                            "comma-separated module names (default: no GCM)")
    group.add_argument("--gcm-w", type=float, default=1e20,
                       help="GCM frequency w in x + eps*sin(w*x), radians per unit of [0, 1] "
                            "pixel value (default: %(default)g)")
    group.add_argument("--gcm-eps", type=float, default=1e-8,
                       help="GCM amplitude eps, [0, 1] pixel scale (default: %(default)g)")
    group.add_argument("--db", default=None,
                       help="results file (SQLite); rerun the same command to resume it "
                            "(default: runs/evaluate/<suite>-<checkpoint folder>[-gcm-<AT>].db)")
    group.add_argument("--mode", default="per-attack", choices=MODES,
                       help="per-attack: every attack on every clean-correct example (exact per-"
                            "attack numbers); worst-case: skip examples already broken "
                            "(default: %(default)s)")
    group.add_argument("--surrogate", default=None,
                       help="checkpoint of the surrogate for transfer attacks (default: the "
                            "evaluated model without GCM)")
    group.add_argument("--samples", type=int, default=4,
                       help="example images kept per attack for the report (default: %(default)s)")
    group.add_argument("--diagnose", action="store_true",
                       help="also run the gradient-masking diagnostics and store the verdict")
    group.add_argument("--progress", default="bar", choices=("bar", "lines", "none"),
                       help="progress display (default: %(default)s)")
    group.add_argument("--device", default="cpu",
                       help="torch device for model and attacks, e.g. cuda (under torchrun: each "
                            "process's GPU LOCAL_RANK, with NCCL) (default: %(default)s; resume a "
                            "run on the device it started on: results are exact per device)")


def evaluate_suite(args: argparse.Namespace) -> int:
    """``gradshield evaluate --suite ...``: load the model and data, run, print the summary as JSON."""
    from gradshield.evaluation import load_suite, run_suite

    if not args.suite:
        raise GradshieldError("--suite is required (built-in: gcm-paper, fgr-paper, adaptive, or a .toml)")
    suite = load_suite(args.suite)
    model, described = load_evaluated_model(args)
    examples = evaluation_data(args, model)
    surrogate = None
    if args.surrogate:
        from gradshield.checkpoint import load_model

        surrogate = load_model(args.surrogate)[0]
        shape = examples.image_shape
        surrogate.data_identity.check(examples.classes, shape, model=f"the surrogate {args.surrogate}",
                                      data=f"the data set {args.dataset}")
    if args.gcm:
        from gradshield.defenses.concealment import conceal

        at = args.gcm if args.gcm in ("front", "all") else args.gcm.split(",")
        model = conceal(model, at=at, w=args.gcm_w, eps=args.gcm_eps)
    device = torch_device(getattr(args, "device", "cpu"))
    model = model.to(device)
    surrogate = surrogate.to(device) if surrogate is not None else None
    name = (Path(args.checkpoint).resolve().parent.name if args.checkpoint
            else args.model.replace(":", "-").replace("/", "-"))
    db = args.db or Path("runs/evaluate") / (
        f"{suite.name}-{name}" + (f"-tta-{args.tta}" if args.tta else "")
        + (f"-gcm-{args.gcm.replace(',', '+')}" if args.gcm else "") + ".db")
    if args.checkpoint:
        from gradshield.data import sha256_file

        described["checkpoint_sha256"] = sha256_file(Path(args.checkpoint))
    info = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **described,
            "gcm": {"at": args.gcm, "w": args.gcm_w, "eps": args.gcm_eps} if args.gcm else None,
            "surrogate": str(args.surrogate) if args.surrogate else None, "device": str(device),
            "data": {**examples.description, "dataset": args.dataset, "split": "val" if
                     args.dataset == "imagenet" else "test", "test_limit": args.test_limit,
                     "per_class": args.per_class, "subset_seed": args.seed}}
    summary = run_suite(model, examples, None, suite, db, seed=args.seed, batch_size=args.batch_size,
                        mode=args.mode, surrogate=surrogate, samples_per_attack=args.samples,
                        diagnose=args.diagnose, info=info, progress=args.progress)
    short = {k: v for k, v in summary.items() if k != "attacks"}
    key = "robust_accuracy" if args.mode == "per-attack" else "cumulative_robust_accuracy"
    short[key] = {r["id"]: r[key] for r in summary["attacks"]}
    short = json.loads(json.dumps(short), parse_constant=lambda _: None)  # NaN -> null
    if distributed.current().main:
        print(json.dumps(short))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.experiment:
        if args.runs:
            raise GradshieldError("give results files or --experiment FILE, not both")
        return _experiment_report(args, command=None)
    if not args.runs:
        raise GradshieldError("give one or more results files (RUN.db), or --experiment FILE")
    from gradshield.evaluation.report import write_report

    print(json.dumps(write_report(args.runs, args.out or "runs/report", title=args.title)))
    return 0


def _experiment_report(args: argparse.Namespace, command: str | None) -> int:
    """Render an experiment's report from its stored results; ``command`` None: the command
    stored by the last ``gradshield experiment`` of this work folder."""
    from gradshield.evaluation.execute import default_workspace, stored_command
    from gradshield.evaluation.experiment import load_experiment
    from gradshield.evaluation.experiment_report import write_experiment_report

    experiment = load_experiment(args.experiment)
    workspace = default_workspace(experiment, args.work_dir)
    if not workspace.root.is_dir():
        raise GradshieldError(f"no results of experiment {experiment.name!r} in {workspace.root}; "
                              f"run `gradshield experiment {args.experiment}` first (or pass "
                              "--work-dir)")
    command = command or stored_command(workspace) or " ".join(["gradshield", *sys.argv[1:]])
    written = write_experiment_report(experiment, workspace, args.out or "results", command=command)
    print(json.dumps(written))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from gradshield.evaluation.execute import default_workspace, run_experiment, store_command
    from gradshield.evaluation.experiment import load_experiment

    experiment = load_experiment(args.experiment)
    workspace = default_workspace(experiment, args.work_dir)
    command = " ".join(["gradshield", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else \
        f"gradshield experiment {args.experiment}"
    context = distributed.current()
    if not args.report_only:
        if context.main:
            store_command(workspace, command)
        run_experiment(experiment, workspace, data_dir=args.data_dir, cache_dir=args.cache_dir,
                       device=args.device, progress=args.progress,
                       only=args.only.split(",") if args.only else None, command=command,
                       weights_dir=args.weights_dir)
    if not context.main:  # rank 0 writes the report
        return 0
    return _experiment_report(args, command=None if args.report_only else command)


def quickstart_table(vanilla: dict, concealed: dict) -> str:
    """A Markdown table: robust accuracy per attack, undefended vs GCM, from two suite summaries."""
    def pct(value) -> str:
        return "n/a" if value is None or value != value else f"{100 * value:.1f}"

    lines = ["| attack (L-inf 8/255) | undefended | GCM (front) |", "|---|---|---|",
             f"| clean accuracy | {pct(vanilla['clean_accuracy'])} "
             f"| {pct(concealed['clean_accuracy'])} |"]
    gcm_rows = {row["id"]: row for row in concealed["attacks"]}
    for row in vanilla["attacks"]:
        other = gcm_rows.get(row["id"], {})
        lines.append(f"| {row['id']} | {pct(row['robust_accuracy'])} "
                     f"| {pct(other.get('robust_accuracy'))} |")
    return "\n".join(lines)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from gradshield.checkpoint import load_model
    from gradshield.defenses.concealment import conceal
    from gradshield.evaluation import run_suite
    from gradshield.evaluation.report import artifacts, write_report
    from gradshield.evaluation.suites import load_suite

    out = Path(args.out)
    args.out = str(out / "model")
    _train(args)
    model, _ = load_model(out / "model" / "checkpoint.pt")
    _, test = _load_data(args)
    x, y = test.as_float()
    suite = load_suite("quickstart")
    summaries = {}
    for name, evaluated in (("undefended", model), ("gcm-front", conceal(model, at="front"))):
        print(f"\nattacking the {name} model on {len(test)} test images (suite '{suite.name}')")
        info = {"command": " ".join(["gradshield", *sys.argv[1:]]),
                "checkpoint": str(out / "model" / "checkpoint.pt"),
                "gcm": {"at": "front", "w": 1e20, "eps": 1e-8} if name == "gcm-front" else None,
                "data": {"dataset": args.dataset, "split": "test", "test_limit": args.test_limit,
                         "subset_seed": args.seed}}
        summaries[name] = run_suite(evaluated, x, y, suite, out / f"{name}.db", seed=args.seed,
                                    classes=test.classes, diagnose=True, info=info,
                                    progress="none" if args.quiet else "bar")
    report = write_report([out / "undefended.db", out / "gcm-front.db"], out / "report",
                          title="gradshield quickstart: undefended vs GCM")
    print()
    print(f"Robust accuracy (%) of {model.config.arch} (seed {args.seed}) on {len(test)} "
          f"{args.dataset} test images:")
    print(quickstart_table(summaries["undefended"], summaries["gcm-front"]))
    for name in summaries:
        stored = artifacts(out / f"{name}.db")
        if "diagnostics" in stored:
            print(f"\n{name}: " + json.loads(stored["diagnostics"])["text"])
    print("\nRead the BPDA, transfer and Square rows: where white-box PGD/FGSM says 'robust' and "
          "they do not, the white-box number is gradient masking, not robustness.")
    print(f"report: {report['html']}")
    return 0


def cmd_defenses(args: argparse.Namespace) -> int:
    import dataclasses
    import inspect
    import textwrap

    from gradshield.defenses.recipes import RECIPES

    for name, factory in sorted(RECIPES.items()):
        doc = textwrap.indent(inspect.cleandoc(factory.__doc__ or ""), "  ")
        print(f"{name}\n{doc}\n  options (--defense-option KEY=VALUE):")
        defaults = {f.name: f.default for f in dataclasses.fields(factory) if f.name != "name"}
        for key, kind in recipe_fields(name).items():
            print(f"    {key} ({getattr(kind, '__name__', kind)}, default {defaults[key]!r})")
        print()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from gradshield.models import list_models

    for name, description in list_models().items():
        print(f"{name:28s} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradshield", description=MAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gradshield {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (checkpoints every epoch, resumes)")
    _add_train_options(p)
    _add_data_options(p, train=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint: clean accuracy, or an attack "
                                        "suite with --suite (resumable, per-example results)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint.pt written by train")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="instead of --checkpoint: a model by name, torchvision:NAME, timm:NAME or "
                        "robustbench:DATASET/THREAT/NAME, with --weights (no gradshield checkpoint "
                        "needed; its normalisation and input size come from its own config)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="with --model: its weights, a local state dict (.pth/.pt, read "
                        "weights-only, or .safetensors); for robustbench: also RobustBench's "
                        "model_dir (<dir>/<dataset>/<threat>/<name>.pt). Never downloaded")
    p.add_argument("--batch-size", type=int, default=500,
                   help="images per forward/attack batch; results do not depend on it "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed choosing the --test-limit subset (default: %(default)s)")
    p.add_argument("--tta", choices=TTA_CHOICES, default=None,
                   help="evaluate (and attack) the same weights with this test-time augmentation "
                        "instead of the model's own (default: the checkpoint's; none for --model)")
    _add_data_options(p, train=False)
    _add_suite_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="Markdown + self-contained HTML report of results files "
                                      "(several are compared side by side)")
    p.add_argument("runs", nargs="*", metavar="RUN.db",
                   help="results files written by `gradshield evaluate --suite`; several are "
                        "shown side by side")
    p.add_argument("--experiment", default=None, metavar="FILE",
                   help="instead: render an experiment's report from its stored results "
                        "(Markdown + PNG + JSON into --out, default results/)")
    p.add_argument("--work-dir", default=None,
                   help="with --experiment: its work folder (default: "
                        "<cache>/experiments/<name>)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/report; results/ with --experiment)")
    p.add_argument("--title", default=None, help="report title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("experiment", help="run an experiment file (models x variants x suites, "
                                          "resumable) and write its report")
    p.add_argument("experiment", metavar="FILE",
                   help="an experiment .toml (see experiments/), or its name in experiments/")
    p.add_argument("--work-dir", default=None,
                   help="where models, results files and analyses are kept (default: "
                        "<cache>/experiments/<name>); rerun the same command to resume")
    p.add_argument("--out", default=None, help="where the report goes (default: results/)")
    p.add_argument("--only", default=None, metavar="MODELS",
                   help="comma-separated models or grids: run only their runs and analyses")
    p.add_argument("--report-only", action="store_true",
                   help="render the report from what is stored; run nothing")
    p.add_argument("--device", default="cpu",
                   help="torch device (under torchrun: cuda is each process's GPU LOCAL_RANK) "
                        "(default: %(default)s)")
    p.add_argument("--weights-dir", default=None,
                   help="folder that relative weights = \"...\" paths of models by name are read "
                        "from (default: the experiment file's folder, else the working directory)")
    p.add_argument("--progress", default="bar", choices=("bar", "lines", "none"),
                   help="progress display (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the data (default: $GRADSHIELD_DATA, else ./data)")
    p.add_argument("--cache-dir", default=None, help="folder for decoded tensors (default: "
                                                     "$GRADSHIELD_CACHE, else ~/.cache/gradshield)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("quickstart", help="train the default model briefly, attack it with and "
                                          "without GCM, print a table, write a report",
                       description="Defaults: --model speedrun --preset speedrun --tta flip "
                                   "--epochs 6 --warmup-epochs 1 (the preset gives the standard "
                                   "recipe label_smoothing=0.2).")
    _add_train_options(p)
    _add_data_options(p, train=True)
    p.set_defaults(func=cmd_quickstart, model="speedrun", preset="speedrun", tta="flip", epochs=6,
                   warmup_epochs=1.0, out="runs/quickstart", test_limit=500)

    p = sub.add_parser("defenses", help="list the training recipes and their options")
    p.set_defaults(func=cmd_defenses)

    p = sub.add_parser("models", help="list the registered architectures")
    p.set_defaults(func=cmd_models)
    return parser


def join_process_group(args: argparse.Namespace) -> bool:
    """Started by torchrun: join the process group (NCCL for --device cuda, gloo otherwise) and
    return True; else False and nothing happens."""
    if not distributed.launched():
        return False
    if args.command not in DISTRIBUTED_COMMANDS:
        raise GradshieldError(f"`gradshield {args.command}` runs in one process; start it without "
                              f"torchrun (torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})")
    distributed.init_from_env(getattr(args, "device", "cpu"))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = False
    try:
        joined = join_process_group(args)
        return args.func(args)
    except GradshieldError as err:
        context = distributed.current()
        where = f" (rank {context.rank} of {context.world_size})" if context.distributed else ""
        print(f"gradshield: error{where}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradshield: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if joined:
            distributed.shutdown()


def run() -> None:
    """The ``gradshield`` command's process: tune the allocator for it (process-wide, so not in
    :func:`main`, which tests and other programs call in their own process), then run ``main``."""
    machine.keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
