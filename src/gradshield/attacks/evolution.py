"""Gradient-free attack by evolution strategies (NES, Ilyas et al. 2018), flow or additive space.

Each step estimates the gradient of the per-example attack loss from ``samples`` antithetic
pairs of Gaussian directions ``u``: ``g = sum_k (L(d + sigma u_k) - L(d - sigma u_k)) u_k /
(2 sigma samples)``, then takes the space's steepest-ascent step of size ``lr`` along ``g`` and
projects onto the budget (as PGD does with the true gradient). Every loss value belongs to one
example: candidates are evaluated in eval mode, so the model treats each image on its own, and
the estimates are reshaped per example (never averaged over the batch). The model is only
queried, never differentiated, so masked or non-differentiable defenses cannot hide from it.

Result semantics as PGD (:mod:`gradshield.attacks.pgd`): success freezes an example; otherwise
the final iterate is returned. ``queries`` = 1 clean + per step ``2 * samples`` + 1 (the check
of the current iterate).
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import (
    LOSSES,
    AttackResult,
    attack_loss,
    channels_last_forward,
    check_attack_inputs,
    check_logits,
    check_positive,
    check_positive_int,
    is_adversarial,
)
from gradshield.errors import GradshieldError
from gradshield.perturbations import Additive, Flow, check_budget, per_example
from gradshield.utils import eval_mode

SPACES = ("flow", "additive")


def _gaussian(shape, generator, like):
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def evolution_strategies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, space: str = "flow",
                         eps: float | torch.Tensor, norm: str = "linf", samples: int = 10,
                         sigma: float | None = None, steps: int = 50, lr: float | None = None,
                         loss: str = "margin", kappa: float = 0.0, padding: str = "border",
                         targeted: bool = False, generator: torch.Generator | None = None,
                         labels: torch.Tensor | None = None, chunk: int = 2048) -> AttackResult:
    """NES attack within the ``norm`` ball of radius ``eps`` of the ``space`` ("flow": pixels;
    "additive": [0, 1] scale). ``sigma`` (default ``eps / 4``) and ``lr`` (default ``2.5 * eps /
    steps``) are in the same units. ``chunk``: images per model call (memory only; the result
    does not depend on it)."""
    check_attack_inputs(model, x, y, targeted=targeted, labels=labels)
    if space not in SPACES:
        raise GradshieldError(f"unknown space {space!r}; choose one of {SPACES}")
    domain = Flow(norm, eps, padding=padding) if space == "flow" else Additive(norm, eps)
    samples = check_positive_int(samples, "samples")
    steps = check_positive_int(steps, "steps")
    chunk = check_positive_int(chunk, "chunk")
    if loss not in LOSSES:
        raise GradshieldError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    scale = domain.eps
    sigma = check_positive(sigma, "sigma") if sigma is not None else None
    lr = check_budget(lr, "lr") if lr is not None else scale * (2.5 / steps)
    n = x.shape[0]
    x = x.detach()
    forward = channels_last_forward(model)  # faster on the CPU; same values
    per_example(scale, x)

    def losses(images, classes):
        values = [attack_loss(forward(part), cls, targeted=targeted, kind=loss, kappa=kappa)
                  for part, cls in zip(images.split(chunk), classes.split(chunk), strict=True)]
        return torch.cat(values)

    with eval_mode(model), torch.no_grad():
        logits = forward(x)
        check_logits(logits, n)
        success = is_adversarial(logits, y, targeted)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        best = domain.init(x)
        active = (~success).nonzero().squeeze(1)
        xa, ya, sub = x[active], y[active], domain.select(active)
        step = lr[active] if isinstance(lr, torch.Tensor) and lr.dim() == 1 else lr
        delta = sub.init(xa)
        for t in range(steps + 1):
            if active.numel() == 0:
                break
            logits = forward(domain.apply(xa, delta))
            queries[active] += 1
            fooled = is_adversarial(logits, ya, targeted)
            best[active] = delta
            success[active[fooled]] = True
            if t == steps:
                break
            if fooled.any():
                keep = ~fooled
                active, xa, ya, delta, sub = active[keep], xa[keep], ya[keep], delta[keep], sub.select(keep)
                step = step[keep] if isinstance(step, torch.Tensor) and step.dim() == 1 else step
                if active.numel() == 0:
                    break
            m = active.numel()
            radius = per_example(sub.eps, delta) / 4 if sigma is None else sigma
            radius = per_example(radius, delta)
            noise = _gaussian((m, samples, *delta.shape[1:]), generator, x)
            spread = (radius[:, None] * noise)
            candidates = torch.cat([delta[:, None] + spread, delta[:, None] - spread], 1)  # (m, 2S, ...)
            repeated = xa[:, None].expand(m, 2 * samples, *xa.shape[1:]).reshape(-1, *xa.shape[1:])
            images = domain.apply(repeated, candidates.reshape(-1, *delta.shape[1:]))
            values = losses(images, ya.repeat_interleave(2 * samples)).view(m, 2, samples)
            queries[active] += 2 * samples
            weights = (values[:, 0] - values[:, 1]).view(m, samples, *[1] * (delta.dim() - 1))
            estimate = (weights * noise).sum(1) / (2 * samples * radius)
            delta = sub.project_feasible(xa, sub.step(xa, delta, estimate, step))
        adversarial = domain.apply(x, best)
    perturbation = adversarial - x if space == "additive" else best
    return AttackResult(adversarial=adversarial, success=success,
                        perturbation_size=domain.size(perturbation), queries=queries,
                        perturbation=perturbation)
