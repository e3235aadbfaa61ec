"""Square attack (Andriushchenko et al. 2020): score-based random search with square updates.

Follows the reference algorithm (as ported to PyTorch in AutoAttack/torchattacks): L-inf starts
from vertical stripes of +-eps and tries a random square of +-eps per channel each query; L2
starts from a grid of signed "pseudo-Gaussian" bumps and moves mass between two random windows.
The square side follows the reference schedule of ``p`` (``p_init`` halved at 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of 10000 rescaled queries). A candidate is kept if it lowers
the loss (margin by default) or fools the model. Differences from the ports: window positions
and signs are drawn per example (the AutoAttack port shares them across the batch, so its
result depends on the batch), and all randomness comes from ``generator``.

``max_queries`` is the budget of model evaluations on perturbed images per example (the
starting point counts as one); the result's ``queries`` adds the clean evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_loss, attack_start, keep
from gradshield.attacks.registry import register
from gradshield.errors import GradshieldError
from gradshield.perturbations import check_norm, norm_of, per_example
from gradshield.utils import random_tensor
from gradshield.validation import check_budget, check_int, check_number

NORMS = ("linf", "l2")


def p_selection(p_init: float, iteration: int, max_queries: int, rescale: bool = True) -> float:
    """The reference schedule of the fraction of pixels a square covers (``rescale``: the
    iteration counted on a scale of 10000 queries, as the paper; AutoAttack's standard version
    does not rescale)."""
    it = int(iteration / max_queries * 10000) if rescale else iteration
    for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
                           (200, 8), (50, 4), (10, 2)):
        if it > bound:
            return p_init / divisor
    return p_init


def _signs(shape, generator, like):
    return torch.where(random_tensor(shape, like, generator) < 0.5, -1.0, 1.0).to(like.dtype)


def _positions(n, high, generator, like):
    """Integers uniform in [0, high) per example (as the reference's randint)."""
    return (random_tensor((n,), like, generator) * high).long().clamp_max(high - 1)


def _window(rows, cols, top, left, s):
    """Boolean masks (N, 1, H, W) of the s x s squares at (top, left)."""
    r = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)
    c = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)
    return (r[:, :, None] & c[:, None, :])[:, None]


def _eta_rectangles(x: int, y: int, like: torch.Tensor) -> torch.Tensor:
    delta = like.new_zeros(x, y)
    xc, yc = x // 2 + 1, y // 2 + 1
    c0, c1 = xc - 1, yc - 1
    for counter in range(max(xc, yc)):
        delta[max(c0, 0):min(c0 + 2 * counter + 1, x), max(0, c1):min(c1 + 2 * counter + 1, y)] += \
            1.0 / (counter + 1) ** 2
        c0, c1 = c0 - 1, c1 - 1
    return delta / delta.pow(2).sum().sqrt()


def _eta(s: int, like: torch.Tensor) -> torch.Tensor:
    """The reference's s x s pseudo-Gaussian bump: + on the top half, - on the bottom, unit L2 norm."""
    delta = like.new_zeros(s, s)
    delta[:s // 2] = _eta_rectangles(s // 2, s, like)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s, like)
    return delta / delta.pow(2).sum().sqrt()


def _place(patches: torch.Tensor, which: torch.Tensor, rows, cols, top, left, s) -> torch.Tensor:
    """Full-size (N, 1, H, W) image holding patch ``patches[which[i]]`` (s x s) at (top, left)."""
    r = (rows[None] - top[:, None]).clamp(0, s - 1)
    c = (cols[None] - left[:, None]).clamp(0, s - 1)
    full = patches[which[:, None, None], r[:, :, None], c[:, None, :]]
    return (full * _window(rows, cols, top, left, s)[:, 0]).unsqueeze(1)


@register(space="additive", norms=NORMS, kind="gradient-free")
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
           norm: str = "linf", max_queries: int = 1000, p_init: float | None = None, loss: str = "margin",
           rescale_schedule: bool = True, targeted: bool = False, generator: torch.Generator | None = None,
           labels: torch.Tensor | None = None) -> AttackResult:
    """Square attack within the L-inf or L2 ball of radius ``eps`` ([0, 1] scale).

    ``p_init``: initial fraction of pixels per square (None: 0.8 for L-inf, 0.1 for L2 as in the
    paper). ``loss``: ``"margin"`` or ``"ce"`` (the quantity the random search lowers).
    ``rescale_schedule``: see :func:`p_selection` (AutoAttack's standard version: False, with
    ``max_queries = 5001``, its 5000 candidates after the starting point).
    """
    check_norm(norm, NORMS)
    eps = check_budget(eps)
    max_queries = check_int(max_queries, "max_queries")
    p_init = (0.8 if norm == "linf" else 0.1) if p_init is None else check_number(p_init, "p_init",
                                                                                 positive=True)
    if p_init > 1:
        raise GradshieldError(f"p_init is a fraction of the image, in (0, 1]; got {p_init}")
    if loss not in ("margin", "ce"):
        raise GradshieldError(f"unknown loss {loss!r}; choose 'margin' or 'ce'")

    def evaluate(images, classes):  # the value the search lowers (margin: > 0 while not fooled)
        out = setup.forward(images)
        value = -attack_loss(out, classes, targeted=targeted, loss=loss, kappa=math.inf)
        return value, setup.fooled(out, classes)

    with attack_start(model, x, y, targeted=targeted, labels=labels) as setup:
        x, success, count = setup.x, setup.success, setup.queries
        _, c, h, w = x.shape
        per_example(eps, x)
        best = x.clone()
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        active = setup.remaining()
        if active.numel():
            xa, ya = x[active], y[active]
            radius = per_example(eps, x)[active]
            if norm == "linf":
                start = (xa + radius * _signs((len(active), c, 1, w), generator, x)).clamp(0, 1)
            else:
                size = h // 5
                offset = (h - size * 5) // 2
                bump = _eta(size, x)
                init = torch.zeros_like(xa)
                for i in range(h // size):
                    for j in range(w // size):
                        top, left = offset + i * size, offset + j * size
                        init[:, :, top:top + size, left:left + size] += \
                            bump * _signs((len(active), c, 1, 1), generator, x)
                start = (xa + init / (norm_of(init, "l2").view(-1, 1, 1, 1) + 1e-12) * radius).clamp(0, 1)
            loss_min, fooled = evaluate(start, ya)
            best[active] = start
            count[active] += 1
            success[active] = fooled
            n_features = c * h * w
            for iteration in range(max_queries - 1):
                if fooled.any():
                    active, xa, ya, radius, loss_min = keep(~fooled, active, xa, ya, radius, loss_min)
                if active.numel() == 0:
                    break
                current = best[active]
                m = len(active)
                p = p_selection(p_init, iteration, max_queries, rescale_schedule)
                if norm == "linf":
                    s = min(max(round(math.sqrt(p * n_features / c)), 1), h - 1)
                    mask = _window(rows, cols, _positions(m, h - s, generator, x),
                                   _positions(m, w - s, generator, x), s)
                    candidate = torch.where(mask, xa + radius * _signs((m, c, 1, 1), generator, x), current)
                    candidate = candidate.clamp(0, 1)
                else:
                    s = max(round(math.sqrt(p * n_features / c)), 3)
                    s = min(s + 1 if s % 2 == 0 else s, h - 1 if (h - 1) % 2 else h - 2)
                    delta = current - xa
                    top1, left1 = _positions(m, h - s, generator, x), _positions(m, w - s, generator, x)
                    top2, left2 = _positions(m, h - s, generator, x), _positions(m, w - s, generator, x)
                    mask1 = _window(rows, cols, top1, left1, s).to(x.dtype)
                    mask2 = _window(rows, cols, top2, left2, s).to(x.dtype)
                    norm_window1 = (delta * mask1).pow(2).sum((2, 3), keepdim=True).sqrt()
                    norm_image = norm_of(delta, "l2").view(-1, 1, 1, 1)
                    norm_windows = norm_of(delta * torch.maximum(mask1, mask2), "l2").view(-1, 1, 1, 1)
                    bump = _eta(s, x)
                    transposed = (random_tensor((m,), x, generator) > 0.5).long()
                    patch = _place(torch.stack([bump, bump.T]), transposed, rows, cols, top1, left1, s)
                    new = patch * _signs((m, c, 1, 1), generator, x) + delta * mask1 / (1e-12 + norm_window1)
                    room = ((radius ** 2 - norm_image ** 2).clamp_min(0) / c + norm_windows ** 2).sqrt()
                    new = new / (1e-12 + new.pow(2).sum((2, 3), keepdim=True).sqrt()) * room
                    delta = delta * (1 - mask2) * (1 - mask1) + new * mask1
                    delta = delta / (norm_of(delta, "l2").view(-1, 1, 1, 1) + 1e-12) * radius
                    candidate = (xa + delta).clamp(0, 1)
                value, fooled = evaluate(candidate, ya)
                count[active] += 1
                improved = fooled | (value < loss_min)
                loss_min = torch.where(improved, value, loss_min)
                best[active[improved]] = candidate[improved]
                success[active[fooled]] = True
    perturbation = best - x
    return AttackResult(adversarial=best, success=success, perturbation_size=norm_of(perturbation, norm),
                        queries=count, perturbation=perturbation)
