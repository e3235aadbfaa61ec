"""Helpers shared by the benchmark scripts: the model, the data, the ideal cost, interleaved timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from gradshield.errors import GradshieldError
from gradshield.paths import cache_dir


def load(checkpoint: str | None = None, arch: str = "compact"):
    """(model in eval mode, description). The compact net comes from ``checkpoint``, else the newest
    test-fixture checkpoint if the test suite has built one; anything else is randomly initialised."""
    from gradshield.checkpoint import load_model
    from gradshield.models import create_model

    if checkpoint is None and arch == "compact":
        found = sorted((cache_dir() / "test-fixtures").glob("compact-*/checkpoint.pt"),
                       key=lambda p: p.stat().st_mtime)
        checkpoint = str(found[-1]) if found else None
    if checkpoint is None:
        torch.manual_seed(0)
        return create_model(arch).eval(), f"{arch} (random init)"
    model, _ = load_model(Path(checkpoint))
    return model.eval(), f"{arch} ({checkpoint})"


def cifar():
    """(train, test) ImageData of the bundled CIFAR-10, or None where no copy is found."""
    from gradshield.data import load_dataset
    from gradshield.paths import data_dir

    for root in (data_dir(), Path(__file__).resolve().parents[2] / "shared" / "datasets"):
        try:
            return load_dataset("cifar10", root)
        except (GradshieldError, OSError):  # no data set there: try the next place
            continue
    return None


def batch(n: int):
    """(images, labels, description): ``n`` CIFAR-10 test images, else random images."""
    data = cifar()
    if data is not None:
        return (*data[1].subset(n, seed=0).as_float(), "CIFAR-10 test images")
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random images"


def fastest_layout(x: torch.Tensor) -> torch.Tensor:
    """The bare model's fastest input layout: channels-last on the CPU (oneDNN), else as given.
    The ideal uses it, so an attack does not look cheap merely because it picks the layout."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def ideal(model, x, y, steps=10):
    """The least a gradient attack of ``steps`` steps can cost: forward + backward w.r.t. the input
    (in the fastest layout)."""
    x = fastest_layout(x)
    for _ in range(steps):
        image = x.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(image), y)
        torch.autograd.grad(loss, image)


def ideal_forward(model, x, passes):
    """The least a score-based attack of ``passes`` queries can cost: bare forward passes (in the
    fastest layout)."""
    x = fastest_layout(x)
    with torch.inference_mode():
        for _ in range(passes):
            model(x)


def time_interleaved(runs: dict[str, Callable], repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Run each callable ``repeats`` times, round-robin (a load change on a shared machine hits all
    alike); returns the seconds per call of each and each one's last output."""
    times = {key: [] for key in runs}
    outputs = {}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            outputs[key] = run()
            times[key].append(time.perf_counter() - start)
    return times, outputs
