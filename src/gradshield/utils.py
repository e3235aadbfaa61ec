"""Small shared helpers: mode restoration, seeding generators and drawing from them, devices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def derived_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a stream key (e.g. an epoch), independent of others."""
    mixed = seed
    for part in stream:
        mixed = (mixed * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


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
    standard normal or standard exponential."""
    device = generator.device if generator is not None else like.device
    if distribution == "uniform":
        out = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    elif distribution == "normal":
        out = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    elif distribution == "exponential":
        out = torch.empty(shape, device=device, dtype=like.dtype).exponential_(generator=generator)
    else:
        raise GradshieldError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return out.to(like.device)
