"""Small models and wrappers shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class OneAtATime(nn.Module):
    """Runs the wrapped model on one example at a time.

    Its arithmetic is then the same whatever the batch size, so a test of batch-size independence
    checks the attack or penalty under test, not which kernel the convolution library picks for
    each batch shape (oneDNN, AMX and bf16 give last-bit differences from one shape to another).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i:i + 1]) for i in range(x.shape[0])])


class GroupMeans(nn.Module):
    """``logits[k] = scale * mean of the pixels of group k``: pixel ``i`` of the flattened image
    belongs to group ``i % classes`` (the last ``size % classes`` pixels to none).

    Each logit depends on its own pixels only, linearly, so targeted attacks have a closed-form
    answer: see :func:`targeted_linf_margin`.
    """

    def __init__(self, classes: int = 10, scale: float = 20.0) -> None:
        super().__init__()
        self.classes, self.scale = classes, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        used = flat.shape[1] // self.classes * self.classes
        return self.scale * flat[:, :used].reshape(x.shape[0], -1, self.classes).mean(1)


def targeted_linf_margin(model: GroupMeans, x: torch.Tensor, target: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """The largest ``logit[target] - max other logit`` any image in the L-inf ball of radius
    ``eps`` around ``x`` (within [0, 1]) reaches: with the target's pixels raised by ``eps`` and
    every other pixel lowered by ``eps`` (optimal for each competing class at once). The target is
    reachable iff it is > 0."""
    high, low = model((x + eps).clamp(0, 1)), model((x - eps).clamp(0, 1))
    best = high.gather(1, target[:, None]).squeeze(1)
    others = low.scatter(1, target[:, None], float("-inf"))
    return best - others.amax(1)


def targeted_problem(n: int = 200, eps: float = 0.05, seed: int = 0):
    """Random 3x8x8 images, the :class:`GroupMeans` model, its predictions ``y``, a random target
    other than ``y`` per image, and the reachable margin of each target within L-inf ``eps``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    model = GroupMeans()
    with torch.no_grad():
        y = model(x).argmax(1)
    target = (y + 1 + torch.randint(0, model.classes - 1, (n,), generator=gen)) % model.classes
    return model, x, y, target, targeted_linf_margin(model, x, target, eps)


def targeted_l2_optimum(model: GroupMeans, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The smallest L2 change of ``x`` that gives the target the highest :class:`GroupMeans`
    logit, when the box [0, 1] does not bind: raise the target's pixels uniformly to a level L
    and lower every class whose mean is above L to L; L minimises the squared cost (a convex
    piecewise quadratic: the mean of the target's and the lowered classes' means)."""
    means = model(x.double()) / model.scale
    per_class = x[0].numel() // model.classes
    sizes = []
    for row, t in zip(means.tolist(), target.tolist(), strict=True):
        own, others = row[t], sorted((v for j, v in enumerate(row) if j != t), reverse=True)
        for k in range(len(others) + 1):  # k classes lowered
            level = (own + sum(others[:k])) / (1 + k)
            if all(v > level for v in others[:k]) and all(v <= level for v in others[k:]):
                break
        cost = (level - own) ** 2 + sum((v - level) ** 2 for v in others[:k])
        sizes.append((per_class * cost) ** 0.5)
    return torch.tensor(sizes, dtype=x.dtype)


class LinearBinary(nn.Module):
    """logits = [0, w.x + b]: the margin of class 1 is linear in x, so optimal attacks are known."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x):
        score = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(score), score], 1)


def spread(batch, n):
    """``n`` examples spread evenly over the batch."""
    images, labels = batch
    index = torch.arange(n) * (len(labels) // n)
    return images[index], labels[index]
