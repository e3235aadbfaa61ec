"""Small shared helpers: mode restoration, seeding generators (whole batches or one rank's rows of
them) and drawing from them, devices."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from gradshield.errors import GradshieldError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every sub-module in eval mode, then restore each one's own train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def derived_seed(seed: int, *stream: int) -> int:
    """The seed of :func:`derived_generator` for ``seed`` and the stream key ``stream``."""
    mixed = seed
    for part in stream:
        mixed = (mixed * 1_000_003 + part + 1) % (2**63 - 1)
    return mixed


def derived_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a stream key (e.g. an epoch), independent of others."""
    return torch.Generator().manual_seed(derived_seed(seed, *stream))


class ShardGenerator(torch.Generator):
    """A CPU generator for one rank of a data-parallel run, serving rows ``start:stop`` of every
    batch of ``total`` rows (the global batch).

    Every rank seeds it alike and draws exactly what one process would draw for the whole batch:
    per-example random values go through :func:`draw_rows`, which draws them for all ``total``
    rows and keeps this rank's; other draws (a data order) are plain draws, the same on every
    rank. So N ranks see, example for example, the randomness of one process on the global batch.
    """

    def __new__(cls, seed: int, start: int, stop: int, total: int):  # torch.Generator's takes a device
        return super().__new__(cls)

    def __init__(self, seed: int, start: int, stop: int, total: int) -> None:
        super().__init__()
        if not 0 <= start < stop <= total:
            raise GradshieldError(f"rows {start}:{stop} are not a slice of a batch of {total}")
        self.manual_seed(seed)
        self.rows = (start, stop, total)


def draw_rows(draw: Callable[[int], torch.Tensor], n: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """``draw(n)``: random values for ``n`` examples (rows along dim 0). With a
    :class:`ShardGenerator`, ``draw(total)[start:stop]``: the whole batch's values, this rank's
    rows of them (``n`` must then be the rank's row count)."""
    rows = getattr(generator, "rows", None)
    if rows is None:
        return draw(n)
    start, stop, total = rows
    if n != stop - start:
        raise GradshieldError(f"per-example random values for {n} examples asked from a generator "
                         f"that serves rows {start}:{stop} of a batch of {total}; draw them for "
                         "the rank's whole share of the batch")
    return draw(total)[start:stop]


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (CPU for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


DISTRIBUTIONS = ("uniform", "normal", "exponential")


def random_tensor(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None = None,
                  distribution: str = "uniform") -> torch.Tensor:
    """Random numbers of ``like``'s dtype on ``like``'s device, drawn from ``generator`` on the
    generator's own device (so a CPU generator drives a GPU attack reproducibly): U[0, 1),
    standard normal or standard exponential. Dim 0 is the examples: with a
    :class:`ShardGenerator` the values are this rank's rows of the global batch's (:func:`draw_rows`)."""
    if distribution not in DISTRIBUTIONS:
        raise GradshieldError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    device = generator.device if generator is not None else like.device

    def draw(n: int) -> torch.Tensor:
        full = (n, *shape[1:])
        if distribution == "uniform":
            return torch.rand(full, generator=generator, device=device, dtype=like.dtype)
        if distribution == "normal":
            return torch.randn(full, generator=generator, device=device, dtype=like.dtype)
        return torch.empty(full, device=device, dtype=like.dtype).exponential_(generator=generator)

    return draw_rows(draw, shape[0], generator).to(like.device)
