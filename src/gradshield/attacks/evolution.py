"""Gradient-free attack by evolution strategies (NES, Ilyas et al. 2018), flow or additive space.

Each step estimates the gradient of the per-example attack loss from ``samples`` antithetic
pairs of Gaussian directions ``u``: ``g = sum_k (L(d + sigma u_k) - L(d - sigma u_k)) u_k /
(2 sigma samples)``, then takes the space's steepest-ascent step of size ``step_size`` along
``g`` and projects onto the budget (as PGD does with the true gradient). Every loss value belongs to one
example: candidates are evaluated in eval mode, so the model treats each image on its own, and
the estimates are reshaped per example (never averaged over the batch). The model is only
queried, never differentiated, so masked or non-differentiable defenses cannot hide from it.

Two objectives (``objective``):

- ``"budget"``: maximise the attack loss inside the ``norm`` ball of radius ``eps`` (projected,
  as PGD);
- ``"penalized"`` (flow space only): no budget; minimise the objective of the optimisation-based
  flow attack, ``c * L_adv + tau * L_flow`` or ``L_adv + c * L_flow`` (``balance``, see
  :func:`gradshield.attacks.stadv.penalized_objective`): the FGR paper's gradient-free attack "with
  ES algorithm and c is 10" (Table 1 caption) as the same objective as its optimisation-based
  one, queried instead of differentiated. :func:`evolution_strategies_penalized` is this mode as
  a minimum-size attack for suites.

Result semantics as PGD (:mod:`gradshield.attacks.pgd`): success freezes an example; otherwise
the final iterate is returned. ``queries`` = 1 clean + per step ``2 * samples`` + 1 (the check
of the current iterate).
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_loss, attack_start, check_loss, keep
from gradshield.attacks.registry import register
from gradshield.attacks.stadv import check_balance, penalized_objective
from gradshield.errors import GradshieldError
from gradshield.perturbations import FLOW_NORMS, Additive, Flow, per_example
from gradshield.utils import random_tensor
from gradshield.validation import check_budget, check_int, check_number

SPACES = ("flow", "additive")
OBJECTIVES = ("budget", "penalized")
#: Penalized mode: sampling spread and step (pixels), gradshield's choice (no budget to scale by).
PENALIZED_SIGMA, PENALIZED_STEP = 0.05, 0.02


@register(space="flow", norms=FLOW_NORMS, kind="gradient-free")
def evolution_strategies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, space: str = "flow",
                         eps: float | torch.Tensor | None = None, norm: str = "linf", samples: int = 10,
                         sigma: float | None = None, steps: int = 50, step_size: float | None = None,
                         loss: str = "margin", kappa: float = 0.0, padding: str = "border",
                         objective: str = "budget", c: float = 10.0, tau: float = 0.05,
                         balance: str = "loss", targeted: bool = False,
                         generator: torch.Generator | None = None,
                         labels: torch.Tensor | None = None, chunk: int = 2048) -> AttackResult:
    """NES attack (module doc). ``objective="budget"``: within the ``norm`` ball of radius ``eps``
    of the ``space`` ("flow": pixels; "additive": [0, 1] scale); ``sigma`` (default ``eps / 4``)
    and ``step_size`` (default ``2.5 * eps / steps``) in the same units. ``objective=
    "penalized"``: flow space, no ``eps``; ``c``, ``tau``, ``balance`` as :func:`stadv`; ``sigma``
    and ``step_size`` in pixels (defaults 0.05 and 0.02). ``chunk``: images per model call
    (memory only; the result does not depend on it)."""
    if space not in SPACES:
        raise GradshieldError(f"unknown space {space!r}; choose one of {SPACES}")
    if objective not in OBJECTIVES:
        raise GradshieldError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    penalized = objective == "penalized"
    if penalized:
        if space != "flow":
            raise GradshieldError("objective='penalized' is for the flow space (its distance term "
                                  "is the flow's smoothness)")
        if eps is not None:
            raise GradshieldError("objective='penalized' takes no eps: c balances the size instead")
        c, tau = check_number(c, "c", positive=True), check_number(tau, "tau")
        check_balance(balance)
        eps = float(max(x.shape[-2:]))  # no budget: a flow longer than the image means nothing
    elif eps is None:
        raise GradshieldError("evolution_strategies needs eps (or objective='penalized')")
    domain = Flow(norm, eps, padding=padding) if space == "flow" else Additive(norm, eps)
    samples = check_int(samples, "samples")
    steps = check_int(steps, "steps")
    chunk = check_int(chunk, "chunk")
    check_loss(loss, targeted, labels)
    scale = domain.eps
    default_sigma = PENALIZED_SIGMA if penalized else None
    sigma = check_number(sigma, "sigma", positive=True) if sigma is not None else default_sigma
    step_size = (check_budget(step_size, "step_size") if step_size is not None
                 else PENALIZED_STEP if penalized else scale * (2.5 / steps))

    def losses(images, classes, true_labels, flows):
        parts = zip(images.split(chunk), classes.split(chunk),
                    [None] * len(classes.split(chunk)) if true_labels is None else true_labels.split(chunk),
                    flows.split(chunk), strict=True)
        if penalized:  # ascend the negative of the objective the optimisation attack minimises
            return torch.cat([-penalized_objective(s.forward(part), cls, flow, c=c, tau=tau,
                                                   balance=balance, kappa=kappa, targeted=targeted)
                              for part, cls, _, flow in parts])
        return torch.cat([attack_loss(s.forward(part), cls, targeted=targeted, loss=loss, kappa=kappa,
                                      labels=lab) for part, cls, lab, _ in parts])

    with attack_start(model, x, y, targeted=targeted, labels=labels) as s:
        x, success, queries = s.x, s.success, s.queries
        per_example(scale, x)
        best = domain.init(x)
        active = s.remaining()
        xa, ya, sub = x[active], y[active], domain.select(active)
        (step,) = keep(active, step_size)
        delta = sub.init(xa)
        for t in range(steps + 1):
            if active.numel() == 0:
                break
            logits = s.forward(domain.apply(xa, delta))
            queries[active] += 1
            fooled = s.fooled(logits, ya)
            best[active] = delta
            success[active[fooled]] = True
            if t == steps:
                break
            if fooled.any():
                active, xa, ya, delta, sub, step = keep(~fooled, active, xa, ya, delta, sub, step)
                if active.numel() == 0:
                    break
            m = active.numel()
            radius = per_example(sub.eps, delta) / 4 if sigma is None else sigma
            radius = per_example(radius, delta)
            noise = random_tensor((m, samples, *delta.shape[1:]), x, generator, "normal")
            spread = (radius[:, None] * noise)
            candidates = torch.cat([delta[:, None] + spread, delta[:, None] - spread], 1)  # (m, 2S, ...)
            repeated = xa[:, None].expand(m, 2 * samples, *xa.shape[1:]).reshape(-1, *xa.shape[1:])
            flat = candidates.reshape(-1, *delta.shape[1:])
            images = domain.apply(repeated, flat)
            true = None if labels is None else labels[active].repeat_interleave(2 * samples)
            values = losses(images, ya.repeat_interleave(2 * samples), true, flat).view(m, 2, samples)
            queries[active] += 2 * samples
            weights = (values[:, 0] - values[:, 1]).view(m, samples, *[1] * (delta.dim() - 1))
            estimate = (weights * noise).sum(1) / (2 * samples * radius)
            delta = sub.project_feasible(xa, sub.step(xa, delta, estimate, step))
        adversarial = domain.apply(x, best)
    perturbation = adversarial - x if space == "additive" else best
    return AttackResult(adversarial=adversarial, success=success,
                        perturbation_size=domain.size(perturbation), queries=queries,
                        perturbation=perturbation)


@register(space="flow", norms=("linf",), kind="gradient-free", bounded=False)
def evolution_strategies_penalized(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                                   c: float = 10.0, tau: float = 0.05, balance: str = "loss",
                                   samples: int = 10, sigma: float | None = None, steps: int = 50,
                                   step_size: float | None = None, kappa: float = 0.0,
                                   padding: str = "border", targeted: bool = False,
                                   generator: torch.Generator | None = None,
                                   labels: torch.Tensor | None = None,
                                   chunk: int = 2048) -> AttackResult:
    """:func:`evolution_strategies` with ``objective="penalized"`` (flow, no budget): the
    gradient-free counterpart of :func:`gradshield.attacks.stadv` with the same objective.
    ``perturbation_size``: the largest displacement component (L-inf, pixels)."""
    return evolution_strategies(model, x, y, space="flow", norm="linf", samples=samples,
                                sigma=sigma, steps=steps, step_size=step_size, kappa=kappa,
                                padding=padding, objective="penalized", c=c, tau=tau,
                                balance=balance, targeted=targeted, generator=generator,
                                labels=labels, chunk=chunk)
