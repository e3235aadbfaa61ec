"""Helpers for tests/test_distributed.py: start N gloo processes, and the work they do.

Importable by the spawned processes (which import this module by name), so everything a process
runs is a module-level function.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from gradshield.data import load_dataset
from gradshield.defenses.recipes import make_recipe
from gradshield.models import create_model
from gradshield.training import TrainConfig, train
from gradshield.utils import ShardGenerator, derived_generator, derived_seed

#: One optimiser step of each recipe on a fixed batch: (recipe name, options).
RECIPES = {
    "standard": ("standard", {}),
    "at": ("at", {"steps": 2}),
    "adt": ("adt", {"steps": 2}),
    "igr": ("igr", {}),
    "fgr": ("fgr", {}),  # random flow start: each rank its rows of the global batch's flows
    "fgr_adt": ("fgr_adt", {"steps": 2}),
    "fgr_finite_difference": ("fgr", {"method": "finite_difference"}),
}
GRADIENT_BATCH = 16
GRADIENT_SEED = 5
# the one-epoch comparison
EPOCH_CONFIG = TrainConfig(epochs=1, batch_size=32, lr=0.05, seed=1, amp="off", warmup_epochs=0.0)
EPOCH_TRAIN, EPOCH_TEST = 256, 64
# the run the CLI's killed-and-resumed run must equal exactly (tests/test_distributed.py)
CLI_TRAIN = {"epochs": 3, "batch_size": 32, "train_limit": 256, "test_limit": 64, "lr": 0.05,
             "seed": 2, "width": 0.25, "defense": "fgr"}
# the sharded evaluation
EVAL_EXAMPLES, EVAL_BATCH = 96, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")


def without_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer replaced by the identity."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model


def smooth_pooling(model: nn.Module) -> nn.Module:
    """``model`` with average pooling instead of max pooling. Max pooling turns a last-bit
    difference between two nearly tied values of a window (zero-padded crops make many) into a
    gradient routed to another pixel, so float rounding would show as a jump, not as rounding."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
    return model


def tiny_model(batchnorm: bool, pooling: str = "max") -> nn.Module:
    torch.manual_seed(0)
    model = create_model("compact", width=0.25)
    model = model if batchnorm else without_batchnorm(model)
    return smooth_pooling(model) if pooling == "average" else model


@functools.cache
def cifar(data_dir: str):
    return load_dataset("cifar10", data_dir)


def epoch_data(data_dir: str):
    train_data, test_data = cifar(data_dir)
    return train_data.subset(EPOCH_TRAIN, seed=0), test_data.subset(EPOCH_TEST, seed=0)


def gradient_batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(GRADIENT_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GRADIENT_BATCH,),
                                                                              generator=g)


def recipe_gradients(rank: int | None, world: int, sync: bool = True,
                     only: tuple[str, ...] | None = None) -> dict[str, list[torch.Tensor]]:
    """Parameter gradients of one step of each recipe (or those ``only``) on
    :func:`gradient_batch` (train mode): ``rank`` None: one process on the whole batch; else this
    rank's share under DDP, averaged (with BatchNorm over the global batch unless ``sync`` is
    False)."""
    from torch.nn.parallel import DistributedDataParallel

    from gradshield.distributed import global_batchnorm

    x, y = gradient_batch()
    out = {}
    for key, (name, options) in RECIPES.items():
        if only is not None and key not in only:
            continue
        model = tiny_model(batchnorm=True).train()
        recipe = make_recipe(name, **options)
        if rank is None:
            loss = recipe(model, x, y, derived_generator(GRADIENT_SEED, 0))
            loss.backward()
        else:
            share = GRADIENT_BATCH // world
            rows = slice(rank * share, (rank + 1) * share)
            generator = ShardGenerator(derived_seed(GRADIENT_SEED, 0), rows.start, rows.stop,
                                       GRADIENT_BATCH)
            with global_batchnorm(model) if sync else _nothing(model):
                net = DistributedDataParallel(model)
                loss = recipe(net, x[rows], y[rows], generator)
                loss.backward()
        out[key] = [p.grad.detach().clone() for p in model.parameters()]
    return out


class _nothing:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        return False


def cli_like_training(data_dir: str, out: Path) -> None:
    """What ``gradshield train`` does with :data:`CLI_TRAIN` (the same data, model and settings)."""
    from gradshield.defenses.recipes import make_recipe as recipe_of

    s = CLI_TRAIN
    train_data, test_data = cifar(data_dir)
    train_data = train_data.subset(s["train_limit"], seed=s["seed"])
    test_data = test_data.subset(s["test_limit"], seed=s["seed"])
    config = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=s["seed"])
    torch.manual_seed(s["seed"])
    model = create_model("compact", num_classes=10, width=s["width"], input_size=(32, 32))
    train(model, train_data, test_data, config, out, recipe=recipe_of(s["defense"]), progress=False)


def scenario(rank: int, world: int, out: str, data_dir: str, checkpoint: str, suite_toml: str) -> None:
    """Everything the spawned test processes do, written under ``out`` by rank 0."""
    from gradshield.checkpoint import load_model
    from gradshield.evaluation import run_suite
    from gradshield.evaluation.suites import parse_suite

    out = Path(out)
    train_data, test_data = epoch_data(data_dir)
    for batchnorm in (False, True):  # one epoch of the training loop
        model = tiny_model(batchnorm, "average")
        train(model, train_data, test_data, EPOCH_CONFIG, out / f"epoch-bn{int(batchnorm)}",
              progress=False)
    gradients = recipe_gradients(rank, world)
    unsynced = recipe_gradients(rank, world, sync=False, only=("standard",))["standard"]
    if rank == 0:
        torch.save({"synced": gradients, "unsynced": unsynced}, out / "gradients.pt")
    cli_like_training(data_dir, out / "cli-like")
    model, _ = load_model(checkpoint)
    x, y = cifar(data_dir)[1].subset(EVAL_EXAMPLES, seed=0).as_float()
    run_suite(model, x, y, parse_suite(suite_toml), out / "eval.db", seed=0,
              batch_size=EVAL_BATCH, progress="none", crafted=out / "crafted.db",
              gradient_figure=False)

