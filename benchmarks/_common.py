"""Helpers shared by the benchmark scripts: the model, the data, the ideal cost, interleaved timing."""

from __future__ import annotations

import functools
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


@functools.cache
def dataset():
    """(train, test, description): the bundled CIFAR-10, or random uint8 stand-ins of the same
    shapes where no copy is found (so a benchmark still runs, and says so)."""
    data = cifar()
    if data is not None:
        return (*data, "CIFAR-10")
    from gradshield.data import ImageData

    g = torch.Generator().manual_seed(0)
    fake = [ImageData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g), tuple(map(str, range(10))))
            for n in (50_000, 10_000)]
    return (*fake, "random images (CIFAR-10 not found)")


def images(n: int, split: str = "test"):
    """(images in [0, 1], labels): a fixed seeded subset of ``n`` images of ``split``."""
    return dataset()[split == "test"].subset(n, seed=0).as_float()


def batch(n: int):
    """(images, labels, description): ``n`` test images."""
    return (*images(n), dataset()[2])


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


def time_interleaved(runs: dict[str, Callable], repeats: int, device: torch.device | None = None
                     ) -> tuple[dict[str, list[float]], dict]:
    """Run each callable ``repeats`` times, round-robin (a load change on a shared machine hits all
    alike); returns the seconds per call of each and each one's last output. On a CUDA
    ``device`` the seconds come from CUDA events recorded around each call (the GPU's own time,
    waited for before the next call); elsewhere from the wall clock."""
    cuda = device is not None and device.type == "cuda"
    times = {key: [] for key in runs}
    outputs = {}
    for _ in range(repeats):
        for key, run in runs.items():
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                outputs[key] = run()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end) / 1000)  # ms -> s
            else:
                start_s = time.perf_counter()
                outputs[key] = run()
                times[key].append(time.perf_counter() - start_s)
    return times, outputs
