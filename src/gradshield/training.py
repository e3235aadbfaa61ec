"""The one training loop: SGD with Nesterov momentum, a warm-up/linear-decay LR, checkpoints each
epoch that resume exactly after a kill, metrics as JSON lines, a progress bar.

Randomness (order, augmentation, a recipe's random starts) comes from a generator derived from
(seed, epoch), so an epoch interrupted by a kill is replayed identically on resume.

Data-parallel (launched by torchrun, :mod:`gradshield.distributed`): ``batch_size`` and ``lr``
are those of the GLOBAL batch. Each of the N ranks draws the seeded epoch order and takes its
``batch_size / N`` rows of each batch, with the augmentation and recipe randomness one process
would give those rows (:class:`~gradshield.utils.ShardGenerator`); the model is wrapped in
DistributedDataParallel (gradients averaged over ranks) and its BatchNorm layers normalise with
the global batch's statistics (:mod:`gradshield.distributed.batchnorm`, differentiable twice for
the exact IGR/FGR penalties). So N ranks compute, to float rounding, the steps of one process on
the global batch. Metrics are summed over ranks; rank 0 alone reads and writes the run folder
(checkpoint written atomically, then every rank waits for it), so a kill of any rank followed
by the same command resumes from the last finished epoch, as in one process.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gradshield import distributed, machine
from gradshield.checkpoint import read_checkpoint, save_checkpoint
from gradshield.data import ImageData, iterate_batches
from gradshield.defenses.recipes import Recipe, StandardRecipe
from gradshield.errors import GradshieldError
from gradshield.metrics import accuracy, predict
from gradshield.utils import ShardGenerator, derived_generator, derived_seed
from gradshield.validation import check_labels

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


SCHEDULES = ("linear", "step")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``lr`` is the peak learning rate (per batch of ``batch_size``).
``batch_size`` is the global batch: in a data-parallel run each of N ranks takes
``batch_size / N`` of it (``lr`` is not rescaled).

    ``schedule``: "linear" (warm-up over ``warmup_epochs``, then linear decay to 0; gradshield's
    default) or "step" (``lr`` multiplied by ``gamma`` at each epoch in ``milestones``, after the
    warm-up if any). ``nesterov``: SGD with Nesterov momentum.

    ``lookahead`` and ``bias_lr_scale`` follow airbench (Jordan 2024, arXiv:2404.00498, Sec. 3):
    ``lookahead`` keeps an exponential moving average of the weights (and BatchNorm statistics),
    updated every 5 steps with decay ``0.95**5 * (step / total)**3``, resets the weights to it
    at each update, and ends the run on it; ``bias_lr_scale`` multiplies the learning rate of
    1-d parameters (biases, BatchNorm shifts) and divides their weight decay by the same factor
    (airbench: 64), so their decay per step is unchanged.

    Augmentation (``augment``): a random crop after ``crop_padding`` pixels of zero padding
    (airbench: 2, reflected) and a horizontal flip: ``flip="random"`` per image and epoch, or
    "alternating" (airbench, Sec. 3.6): a seeded half of the images is mirrored in even epochs,
    the other half in odd ones, so each image is seen both ways every two epochs."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: str = "auto"  # "bf16": bfloat16 autocast on CPU; "off": float32; "auto": bf16 if fast
    channels_last: bool = True
    augment: bool = True
    schedule: str = "linear"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    nesterov: bool = True
    lookahead: bool = False
    bias_lr_scale: float = 1.0
    crop_padding: int = 4
    flip: str = "random"

    def validate(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise GradshieldError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.schedule not in SCHEDULES:
            raise GradshieldError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if any(not isinstance(m, int) or m < 1 for m in self.milestones) or \
                list(self.milestones) != sorted(self.milestones):
            raise GradshieldError(f"milestones must be increasing epoch numbers >= 1, got "
                                  f"{self.milestones}")
        if self.schedule == "linear" and self.milestones:
            raise GradshieldError("milestones are for schedule='step'")
        if not 0 < self.gamma <= 1:
            raise GradshieldError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise GradshieldError(
                f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, momentum={self.momentum}")
        if self.flip not in ("random", "alternating") or self.crop_padding < 0:
            raise GradshieldError(f"need flip 'random' or 'alternating' and crop_padding >= 0; "
                                  f"got flip={self.flip!r}, crop_padding={self.crop_padding}")
        if self.bias_lr_scale <= 0:
            raise GradshieldError(f"bias_lr_scale must be > 0, got {self.bias_lr_scale}")
        if self.amp not in ("auto", "bf16", "off"):
            raise GradshieldError(f"amp must be auto, bf16 or off, got {self.amp!r}")


#: Named settings from the papers (and their authors' code), attributed; ``gradshield train
#: --preset NAME`` and an experiment's ``train = {preset = NAME, ...}`` start from them.
PRESETS: dict[str, dict] = {
    # FGR paper, Sec. 5.1: "SGD optimizer with momentum of 0.9 and weight decay of 5e-4 ... the total
    # training duration is 60 epochs. The initial learning rate is 0.1 and is dropped by 10 after
    # 30 and 50 epochs." Its batch size is garbled in the text ("set to 0.9"); 128 is the authors'
    # code's. Plain momentum (the paper names no Nesterov), no warm-up.
    "fgr-paper": {"epochs": 60, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 5e-4, "warmup_epochs": 0.0, "schedule": "step",
                  "milestones": (30, 50), "gamma": 0.1, "nesterov": False},
    # The FGR authors' code (xpf/Flow-Gradient-Regularization): utils/settings.py "epochs: 80,
    # batch_size: 128, learning_rate: 0.01, decay_steps: [40, 60]"; train.py "optim.SGD(...,
    # weight_decay=5e-4, momentum=0.9)", "MultiStepLR(optimizer, DSET['decay_steps'], 0.1)".
    "fgr-code": {"epochs": 80, "batch_size": 128, "lr": 0.01, "momentum": 0.9,
                 "weight_decay": 5e-4, "warmup_epochs": 0.0, "schedule": "step",
                 "milestones": (40, 60), "gamma": 0.1, "nesterov": False},
    # For the `speedrun` model: airbench's optimiser (Jordan 2024, arXiv:2404.00498) rescaled to
    # the mean loss at batch 512, 2-pixel crops and alternating flips; 16 epochs fit 10 minutes
    # on a 2-core CPU. experiments/training-cifar10.toml says where it departs from airbench.
    # Label smoothing 0.2 (airbench's) is a recipe option: PRESET_OPTIONS below.
    "speedrun": {"epochs": 16, "batch_size": 512, "lr": 0.75, "momentum": 0.85,
                 "weight_decay": 1.3e-3, "warmup_epochs": 3.0, "bias_lr_scale": 64.0,
                 "lookahead": True, "crop_padding": 2, "flip": "alternating"},
}

#: Defense-recipe options a preset sets, per recipe (``{preset: {defense: {option: value}}}``);
#: options the user gives win. A recipe not named here gets none of them.
PRESET_OPTIONS: dict[str, dict[str, dict]] = {
    "speedrun": {"standard": {"label_smoothing": 0.2}},
}


def preset_options(preset: str | None, defense: str) -> dict:
    """The recipe options ``preset`` sets for the defense recipe ``defense`` (may be empty)."""
    return dict(PRESET_OPTIONS.get(preset or "", {}).get(defense, {}))


def describe_preset(name: str) -> str:
    """A preset's settings as ``key=value`` text (JSON values), recipe options included."""
    parts = [f"{key}={json.dumps(value)}" for key, value in PRESETS[name].items()]
    parts += [f"{key}={json.dumps(value)} for the {defense} recipe"
              for defense, options in PRESET_OPTIONS.get(name, {}).items()
              for key, value in options.items()]
    return ", ".join(parts)


def preset_config(name: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a named preset with ``overrides`` on top."""
    if name not in PRESETS:
        raise GradshieldError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **overrides})


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, *,
                  schedule: str = "linear", steps_per_epoch: int = 1,
                  milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """The learning rate at optimiser step ``step``: linear warm-up from 0 to ``peak`` over
    ``warmup_steps``; then "linear": decay to 0 at ``total_steps``; "step": ``peak`` times
    ``gamma`` per milestone epoch passed."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return peak * gamma ** sum(epoch >= m for m in milestones)
    remaining = max(1, total_steps - warmup_steps)
    return peak * max(0.0, 1.0 - (step - warmup_steps) / remaining)


def bf16_is_fast() -> bool:
    """True on CPUs with native bfloat16 dot products (AVX512-BF16 / AMX), where autocast pays."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
        return capability in ("AVX512", "AMX") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def use_bf16(config: TrainConfig, device: torch.device) -> bool:
    if config.amp == "off":
        return False
    if config.amp == "bf16":
        return True
    return device.type == "cuda" or (device.type == "cpu" and bf16_is_fast())


#: Settings added after runs were cached: left out of the fingerprint at their default, so a run
#: made before they existed still resumes.
_LATER_SETTINGS = ("lookahead", "bias_lr_scale", "crop_padding", "flip")


def config_fingerprint(model: nn.Module, config: TrainConfig, recipe: Recipe,
                        n_train: int) -> dict:
    model_config = getattr(model, "config", None)
    defaults = TrainConfig()
    train = {key: value for key, value in asdict(config).items()
             if key not in _LATER_SETTINGS or value != getattr(defaults, key)}
    return {"train": train, "recipe": recipe.describe(), "n_train": n_train,
            "model": model_config.to_dict() if model_config else None}


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def _check_data_fits_model(model: nn.Module, data: ImageData, what: str) -> None:
    model_config = getattr(model, "config", None)
    num_classes = model_config.num_classes if model_config else None
    check_labels(data.labels, len(data), num_classes, name=f"{what} labels")
    if model_config and tuple(data.image_shape[1:]) != tuple(model_config.input_size):
        raise GradshieldError(
            f"{what} images are {tuple(data.image_shape[1:])} pixels but the model expects "
            f"{tuple(model_config.input_size)}; resize the data or build the model with "
            "input_size set")


def _epoch_generator(config: TrainConfig, epoch: int, context: distributed.Context) -> torch.Generator:
    """The epoch's generator: one process's, or this rank's rows of every global batch."""
    if not context.distributed:
        return derived_generator(config.seed, epoch)
    share = config.batch_size // context.world_size
    return ShardGenerator(derived_seed(config.seed, epoch), context.rank * share,
                          (context.rank + 1) * share, config.batch_size)


def _alternating_flips(config: TrainConfig, epoch: int, n: int) -> torch.Tensor | None:
    """Which of the ``n`` training images to mirror in ``epoch`` under ``flip="alternating"``:
    a seeded half, and its complement in odd epochs (None under random flips)."""
    if config.flip != "alternating":
        return None
    first = torch.randperm(n, generator=derived_generator(config.seed, -2)) < n // 2
    return first ^ bool(epoch % 2)


def _test_accuracy(model: nn.Module, data: ImageData, device: torch.device,
                   memory_format: torch.memory_format, context: distributed.Context) -> float:
    """Clean accuracy on ``data``; in a data-parallel run each rank predicts a contiguous share and
    the correct counts are summed."""
    x, y = data.as_float()
    if not context.distributed:
        return accuracy(model, x.to(device, memory_format=memory_format), y.to(device))
    share = torch.tensor_split(torch.arange(len(data)), context.world_size)[context.rank]
    x, y = x[share], y[share]
    correct = int((predict(model, x.to(device, memory_format=memory_format)).cpu() == y).sum()) \
        if len(share) else 0
    (total,) = distributed.all_sum([correct], context)
    return total / len(data)


def init_from_data(model: nn.Module, data: ImageData, seed: int) -> None:
    """Give a model with a data-dependent initialisation (``net.init_from_data``, e.g. the
    whitening stem of ``speedrun``) its statistics: the first images of a seeded order of
    ``data``, normalised as the model's input. Every rank computes the same."""
    net = getattr(model, "net", model)
    init = getattr(net, "init_from_data", None)
    if init is None:
        return
    order = torch.randperm(len(data), generator=derived_generator(seed, -1))[:net.init_images]
    device = next(model.parameters()).device
    x = data.images[order].float().div_(255.0).to(device)
    normalize = getattr(model, "normalize", None)
    init(normalize(x) if normalize is not None else x)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """SGD's parameter groups: 1-d parameters get ``bias_lr_scale`` x the learning rate and
    1 / ``bias_lr_scale`` x the weight decay (one group when the scale is 1)."""
    params = list(model.parameters())
    if config.bias_lr_scale == 1.0:
        return [{"params": params, "lr_scale": 1.0, "weight_decay": config.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0,
             "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "lr_scale": config.bias_lr_scale,
             "weight_decay": config.weight_decay / config.bias_lr_scale}]


class Lookahead:
    """airbench's Lookahead: a moving average of the floating-point state (weights and
    BatchNorm statistics) that the weights are reset to at each update."""

    EVERY = 5

    def __init__(self, model: nn.Module) -> None:
        self.average = {key: value.detach().clone() for key, value in model.state_dict().items()
                        if value.is_floating_point()}

    @staticmethod
    def decay(step: int, total_steps: int) -> float:
        return 0.95 ** 5 * (step / max(1, total_steps)) ** 3

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        state = model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1.0 - decay)
            state[key].copy_(average)


def _no_buffer_broadcast() -> dict:
    """DDP's option not to broadcast rank 0's buffers before each forward pass (the BatchNorm
    statistics agree on every rank by construction): ``forward_sync_buffers`` since torch 2.14,
    ``broadcast_buffers`` before."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _resume_state(ckpt_path: Path, metrics_path: Path, fingerprint: dict, resume: bool,
                  run_dir: Path) -> tuple[dict | None, list[dict]]:
    """(checkpoint dict to resume from or None, metrics history up to it); runs on rank 0."""
    if resume and ckpt_path.is_file():
        blob = read_checkpoint(ckpt_path)
        if blob.get("fingerprint") != fingerprint:
            raise GradshieldError(
                f"{run_dir} holds a run with different settings; pass another output directory "
                "or --no-resume to start over (the old checkpoint will be overwritten)")
        history = _read_metrics(metrics_path, blob["epoch"])
        if history:  # drop lines written after the checkpoint we resume from
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        return blob, history
    if metrics_path.exists():
        metrics_path.unlink()
    return None, []


def train(model: nn.Module, train_data: ImageData, test_data: ImageData | None,
          config: TrainConfig, run_dir: str | os.PathLike, *, recipe: Recipe | None = None,
          resume: bool = True, progress: bool = True, extra_metadata: dict | None = None,
          stop_after_steps: int | None = None) -> list[dict]:
    """Train ``model`` in place; write ``run_dir/checkpoint.pt`` each epoch and metrics lines.

    Returns the per-epoch metrics. With ``resume`` and a checkpoint in ``run_dir`` made with the
    same settings, training continues after its last finished epoch. ``stop_after_steps`` ends
    the run early after that many optimiser steps (used to test resuming).
    """
    config.validate()
    recipe = recipe or StandardRecipe()
    context = distributed.current()
    if config.batch_size % context.world_size:
        raise GradshieldError(
            f"the batch size {config.batch_size} is the global batch and must be a multiple of the "
            f"{context.world_size} processes; pass --batch-size {context.world_size} x (images "
            "per process)")
    run_dir = Path(run_dir)
    if context.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = run_dir / CHECKPOINT_NAME, run_dir / METRICS_NAME
    device = next(model.parameters()).device
    fingerprint = config_fingerprint(model, config, recipe, len(train_data))
    _check_data_fits_model(model, train_data, "training")
    if test_data is not None:
        _check_data_fits_model(model, test_data, "test")
    distributed.check_same(fingerprint, "the training settings, data size and model", context)

    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    start_epoch, elapsed = 0, 0.0
    blob, history = distributed.on_main(
        lambda: _resume_state(ckpt_path, metrics_path, fingerprint, resume, run_dir), context)
    if blob is None:  # a resumed run takes the data-dependent initialisation from its checkpoint
        init_from_data(model, train_data, config.seed)
    model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(_param_groups(model, config), lr=config.lr,
                                momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay)
    if blob is not None:
        model.load_state_dict(blob["model_state"])
        optimizer.load_state_dict(blob["optimizer_state"])
        torch.set_rng_state(blob["rng_state"])
        start_epoch, elapsed = blob["epoch"] + 1, blob["elapsed_s"]
    lookahead = Lookahead(model) if config.lookahead else None
    if lookahead is not None and blob is not None and "lookahead_state" in blob:
        lookahead.average = {key: value.to(device) for key, value in blob["lookahead_state"].items()}
    del blob

    steps_per_epoch = max(1, len(train_data) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "linear":
        warmup_steps = max(1, warmup_steps)
    bf16 = use_bf16(config, device)
    where = machine.describe(device, bf16=bf16, processes=context.world_size)
    progress = progress and context.main
    steps_done = 0
    with contextlib.ExitStack() as stack:
        net = model
        if context.distributed:  # BatchNorm over the global batch, gradients averaged by DDP
            from torch.nn.parallel import DistributedDataParallel

            stack.enter_context(distributed.global_batchnorm(model))
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          **_no_buffer_broadcast())
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            generator = _epoch_generator(config, epoch, context)
            model.train()
            loss_sum, seen = 0.0, 0
            batches = iterate_batches(train_data, config.batch_size, shuffle=True,
                                      generator=generator, augment=config.augment, drop_last=True,
                                      padding=config.crop_padding,
                                      flips=_alternating_flips(config, epoch, len(train_data)))
            bar = tqdm(batches, total=steps_per_epoch, disable=not progress, leave=False,
                       mininterval=2, desc=f"epoch {epoch + 1}/{config.epochs}")
            for i, (x, y) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                lr = learning_rate(step, total_steps, config.lr, warmup_steps,
                                   schedule=config.schedule, steps_per_epoch=steps_per_epoch,
                                   milestones=config.milestones, gamma=config.gamma)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                x = x.to(device, memory_format=memory_format)
                y = y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = recipe(net, x, y, generator)
                if not torch.isfinite(loss):
                    raise GradshieldError(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, step {i}; "
                        "lower the learning rate (--lr) or the defense's weight")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if lookahead is not None and (step + 1) % Lookahead.EVERY == 0:
                    lookahead.update(model, Lookahead.decay(step + 1, total_steps))
                loss_sum += float(loss.detach()) * y.shape[0]
                seen += y.shape[0]
                steps_done += 1
                if stop_after_steps is not None and steps_done >= stop_after_steps:
                    return history
            if lookahead is not None and epoch == config.epochs - 1:
                lookahead.update(model, 1.0)  # the run ends on the average
            loss_sum, seen = distributed.all_sum([loss_sum, seen], context)
            elapsed += time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": loss_sum / max(1, seen),
                   "lr_end": optimizer.param_groups[0]["lr"], "elapsed_s": round(elapsed, 2),
                   "machine": where}
            if test_data is not None:  # not counted in elapsed_s (training time only)
                t1 = time.perf_counter()
                row["test_acc"] = _test_accuracy(model, test_data, device, memory_format, context)
                if getattr(getattr(model, "config", None), "tta", ""):  # the same weights, bare
                    bare = nn.Sequential(model.normalize, model.net)
                    row["test_acc_plain"] = _test_accuracy(bare, test_data, device, memory_format,
                                                           context)
                row["eval_s"] = round(time.perf_counter() - t1, 2)
            history.append(row)
            if context.main:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                save_checkpoint(ckpt_path, {
                    "model_config": fingerprint["model"], "model_state": model.state_dict(),
                    "optimizer_state": optimizer.state_dict(), "rng_state": torch.get_rng_state(),
                    "epoch": epoch, "elapsed_s": elapsed, "fingerprint": fingerprint,
                    "classes": list(train_data.classes), "image_shape": list(train_data.image_shape),
                    "metrics": history, "world_size": context.world_size,
                    **({"lookahead_state": lookahead.average} if lookahead is not None else {}),
                    "train_config": asdict(config), "recipe": recipe.describe(),
                    **(extra_metadata or {}),
                })
            distributed.barrier(context)  # every rank sees the finished epoch's checkpoint
            if progress:
                shown = f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""
                tqdm.write(f"epoch {epoch + 1}/{config.epochs} loss {row['train_loss']:.4f}"
                           f"{shown} ({elapsed:.0f} s)")
        del net  # DDP's gradient hooks go with it
    model.eval()
    return history
