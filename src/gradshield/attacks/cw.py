"""Carlini & Wagner L2 (2017): minimum-norm attack with a binary search over the constant ``c``.

Minimises ``||x' - x||_2^2 + c * max(z_y - max_{j!=y} z_j, -kappa)`` (untargeted; targeted:
``max(max_{j!=t} z_j - z_t, -kappa)``) over ``w`` with ``x' = (tanh(w) + 1) / 2`` (the box
constraint [0, 1] by change of variables), with Adam. Per example, ``c`` starts at ``c`` and is
halved towards the smallest successful value (found) or multiplied by 10 (not found yet) after
each of the ``binary_search_steps`` rounds (Carlini's schedule). The GCM paper's setting: 10
search steps, lr 1e-2.

Initial ``c = 1e-2``: the squared L2 distance of a typical CIFAR adversarial is 0.01-0.1 ([0, 1]
scale) and logit margins are O(1), so 1e-2 starts near the balance; the x10 search covers
1e-2 ... 1e7 in 10 rounds.
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_start, margin
from gradshield.attacks.registry import register
from gradshield.validation import check_int, check_number

_TANH_LIMIT = 1 - 1e-6  # atanh(+-1) is infinite: pixels at 0 or 1 start just inside the box


@register(space="additive", norms=("l2",), kind="iterative", bounded=False)
def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 1e-2, kappa: float = 0.0,
          steps: int = 100, lr: float = 1e-2, binary_search_steps: int = 10, targeted: bool = False,
          labels: torch.Tensor | None = None) -> AttackResult:
    """C&W-L2; returns per example the smallest-L2 adversarial found over all rounds ([0, 1] scale).

    ``queries`` = 1 + ``binary_search_steps * steps`` for every attacked example.
    """
    c = check_number(c, "c", positive=True)
    kappa = check_number(kappa, "kappa")
    lr = check_number(lr, "lr", positive=True)
    steps = check_int(steps, "steps")
    binary_search_steps = check_int(binary_search_steps, "binary_search_steps")
    with attack_start(model, x, y, targeted=targeted, labels=labels) as s:
        x, forward, queries = s.x, s.forward, s.queries
        best_adv = x.clone()
        best_l2 = torch.where(s.success, 0.0, float("inf")).to(x.dtype)
        active = s.remaining()
        if active.numel():
            xa, ya = x[active], y[active]
            w0 = torch.atanh((2 * xa - 1).clamp(-_TANH_LIMIT, _TANH_LIMIT))
            const = torch.full((active.numel(),), c, dtype=x.dtype, device=x.device)
            lower = torch.zeros_like(const)
            upper = torch.full_like(const, float("inf"))
            for _ in range(binary_search_steps):
                w = w0.clone().requires_grad_(True)
                optimizer = torch.optim.Adam([w], lr=lr)
                found = torch.zeros_like(const, dtype=torch.bool)
                for _ in range(steps):
                    with torch.enable_grad():
                        adv = (torch.tanh(w) + 1) / 2
                        out = forward(adv)
                        l2 = (adv - xa).flatten(1).pow(2).sum(1)
                        gap = margin(out, ya)  # own - best other (targeted: target - best other)
                        gap = -gap if targeted else gap
                        loss = l2 + const * gap.clamp(min=-kappa)
                        # gradient w.r.t. w only: the model's own .grad fields stay untouched
                        (w.grad,) = torch.autograd.grad(loss.sum(), w)
                    fooled = s.fooled(out.detach(), ya)
                    hit = fooled & (gap.detach() <= -kappa)
                    found |= hit
                    l2 = l2.detach()
                    better = fooled & (l2 < best_l2[active])
                    if better.any():
                        best_l2[active[better]] = l2[better]
                        best_adv[active[better]] = adv.detach()[better]
                    optimizer.step()
                queries[active] += steps
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                const = torch.where(upper.isinf(), const * 10, (lower + upper) / 2)
    success = best_l2.isfinite()
    perturbation = best_adv - x
    return AttackResult(adversarial=best_adv, success=success,
                        perturbation_size=perturbation.flatten(1).norm(dim=1), queries=queries,
                        perturbation=perturbation)
