"""The one projected-gradient engine, and the attacks that are just settings of it.

FGSM, PGD-L-inf/L2/L1 and the flow single-/multi-step attacks differ only in the perturbation
space (:mod:`gradshield.perturbations`), the number of steps and the step size.

Semantics (all of them):
- the clean forward pass is computed once; examples already fooled there are returned unchanged
  (``success=True``, size 0) and never attacked;
- every iterate's forward pass also checks success; an example is frozen (and leaves the batch)
  at its first adversarial iterate, so later steps never undo a success;
- an example never fooled returns the final iterate of the restart with the highest final loss
  (for one restart: exactly the usual last PGD iterate);
- ``queries`` counts the model evaluations per example: 1 clean + 1 per gradient step + 1 final
  evaluation per restart it took part in; without a random start the first gradient step is taken
  at the clean image (zero perturbation, applied exactly), so the clean evaluation IS that step's
  forward pass and is not repeated (one evaluation fewer).
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
    check_positive_int,
    is_adversarial,
)
from gradshield.errors import GradshieldError
from gradshield.perturbations import Additive, Flow, Space, check_budget, per_example
from gradshield.utils import eval_mode


def _loss_and_grad(model, space, x, y, delta, *, targeted, loss, kappa):
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(space.apply(x, delta))
        check_logits(logits, x.shape[0])
        values = attack_loss(logits, y, targeted=targeted, kind=loss, kappa=kappa)
        (grad,) = torch.autograd.grad(values.sum(), delta)
    return values.detach(), grad, logits.detach()


def _take(value, index):
    """Index a per-example tensor (N,) with ``index``; pass floats through."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


def projected_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, space: Space, *,
                       steps: int, step_size: float | torch.Tensor, random_start: bool = False,
                       restarts: int = 1, targeted: bool = False, loss: str = "ce", kappa: float = 0.0,
                       generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None) -> AttackResult:
    """Projected steepest ascent of a per-example loss within ``space`` (the engine of every PGD attack).

    ``step_size`` is in the space's units (a float or (N,) tensor); ``loss`` is ``"ce"`` or
    ``"margin"`` (``kappa``: margin cap). See the module docstring for the result semantics.
    """
    check_attack_inputs(model, x, y, targeted=targeted, labels=labels)
    steps = check_positive_int(steps, "steps")
    restarts = check_positive_int(restarts, "restarts")
    step_size = check_budget(step_size, "step_size")
    if loss not in LOSSES:
        raise GradshieldError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if restarts > 1 and not random_start:
        raise GradshieldError("restarts > 1 repeats the same deterministic run; set random_start=True")
    n = x.shape[0]
    x = x.detach()
    per_example(space.eps, x), per_example(step_size, x)  # per-example budgets must have N entries
    forward = channels_last_forward(model)
    with eval_mode(model), torch.no_grad():
        first_step = None  # (loss, grad, logits) of the first step when it is taken at x itself
        if random_start:
            logits = forward(x)
            check_logits(logits, n)
        else:
            first_step = _loss_and_grad(forward, space, x, y, space.init(x), targeted=targeted,
                                        loss=loss, kappa=kappa)
            logits = first_step[2]
        success = is_adversarial(logits, y, targeted)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        best = space.init(x)
        best_loss = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
        for _ in range(restarts):
            active = (~success).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, ya, sub, sa = x[active], y[active], space.select(active), _take(step_size, active)
            delta = sub.init(xa, random=random_start, generator=generator)
            for t in range(steps + 1):
                reused = t == 0 and first_step is not None  # the clean pass, already evaluated
                if reused:
                    values, grad, logits = (part[active] for part in first_step)
                elif t < steps:
                    values, grad, logits = _loss_and_grad(forward, sub, xa, ya, delta,
                                                          targeted=targeted, loss=loss, kappa=kappa)
                else:
                    logits = forward(sub.apply(xa, delta))
                    values = attack_loss(logits, ya, targeted=targeted, kind=loss, kappa=kappa)
                if not reused:
                    queries[active] += 1
                fooled = is_adversarial(logits, ya, targeted)
                # success freezes an example; otherwise keep the final iterate of the best restart
                record = fooled | (values > best_loss[active]) if t == steps else fooled
                if record.any():
                    best[active[record]] = delta[record]
                    best_loss[active[record]] = values[record]
                    success[active[fooled]] = True
                if t == steps:
                    break
                if fooled.any():
                    keep = ~fooled
                    active, xa, ya, delta, grad = active[keep], xa[keep], ya[keep], delta[keep], grad[keep]
                    sub, sa = sub.select(keep), _take(sa, keep)
                    if active.numel() == 0:
                        break
                delta = sub.project_feasible(xa, sub.step(xa, delta, grad, sa))
        adversarial = space.apply(x, best)
    perturbation = adversarial - x if isinstance(space, Additive) else best
    return AttackResult(adversarial=adversarial, success=success, perturbation_size=space.size(perturbation),
                        queries=queries, perturbation=perturbation)


def _step_size(eps, steps: int, step_size, rel_step_size):
    if step_size is not None and rel_step_size is not None:
        raise GradshieldError("give step_size or rel_step_size, not both")
    if step_size is not None:
        return check_budget(step_size, "step_size")
    rel = 2.5 / steps if rel_step_size is None else check_budget(rel_step_size, "rel_step_size")
    return check_budget(eps) * rel


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor, norm: str = "linf",
        steps: int = 10, step_size: float | torch.Tensor | None = None, rel_step_size: float | None = None,
        random_start: bool = False, restarts: int = 1, targeted: bool = False, loss: str = "ce",
        generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
        l1_top_k: int | None = None) -> AttackResult:
    """PGD with additive noise (Madry et al. 2018) in the L-inf, L2 or L1 ball of radius ``eps``.

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale. Default step size: ``2.5 * eps /
    steps`` (Madry's rule); ``rel_step_size`` gives it as a fraction of ``eps`` instead.
    ``l1_top_k``: coordinates moved per L1 step (None: 1 % of them; 1: ART's L1 step).
    """
    space = Additive(norm, eps, l1_top_k=l1_top_k)
    steps = check_positive_int(steps, "steps")
    return projected_gradient(model, x, y, space, steps=steps,
                              step_size=_step_size(space.eps, steps, step_size, rel_step_size),
                              random_start=random_start, restarts=restarts, targeted=targeted, loss=loss,
                              generator=generator, labels=labels)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
         targeted: bool = False, loss: str = "ce", labels: torch.Tensor | None = None) -> AttackResult:
    """FGSM (Goodfellow et al. 2015): one L-inf sign step of size ``eps``, no random start."""
    return pgd(model, x, y, eps=eps, norm="linf", steps=1, rel_step_size=1.0, targeted=targeted, loss=loss,
               labels=labels)


def flow_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
             norm: str = "linf", steps: int = 20, step_size: float | torch.Tensor | None = None,
             rel_step_size: float | None = None, random_start: bool = False, restarts: int = 1,
             padding: str = "border", targeted: bool = False, loss: str = "ce",
             generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> AttackResult:
    """Multi-step flow attack: PGD on a per-pixel flow field, ``eps`` and ``step_size`` in pixels.

    ``norm="linf"`` bounds each displacement component per pixel; ``"l2"`` the whole field.
    Default step size ``2.5 * eps / steps``. The FGR paper's budgets are in grid_sample units:
    convert with :func:`gradshield.warp.normalized_to_pixels` (0.01 at 32 px = 0.155 px). The
    paper's evaluation code (``attacks/gradient.py``: sign steps of ``eps / iters`` on the
    cross-entropy, clamp to the L-inf ball, 100 iterations, grid_sample's default zero padding)
    is ``flow_pgd(eps=normalized_to_pixels(0.01, 32), steps=100, rel_step_size=0.01,
    padding="zeros")``, except that we stop per example at the first success.
    """
    space = Flow(norm, eps, padding=padding)
    steps = check_positive_int(steps, "steps")
    return projected_gradient(model, x, y, space, steps=steps,
                              step_size=_step_size(space.eps, steps, step_size, rel_step_size),
                              random_start=random_start, restarts=restarts, targeted=targeted, loss=loss,
                              generator=generator, labels=labels)


def flow_single_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
                     norm: str = "linf", padding: str = "border", targeted: bool = False, loss: str = "ce",
                     labels: torch.Tensor | None = None) -> AttackResult:
    """Single-step flow attack (the flow analogue of FGSM): one steepest step of size ``eps`` pixels."""
    return flow_pgd(model, x, y, eps=eps, norm=norm, steps=1, rel_step_size=1.0, padding=padding,
                    targeted=targeted, loss=loss, labels=labels)
