"""The one projected-gradient engine, and the attacks that are just settings of it.

FGSM, PGD-L-inf/L2/L1, the flow single-/multi-step attacks and APGD differ only in the
perturbation space (:mod:`gradshield.perturbations`), the number of steps and the *step rule*:
:class:`ConstantStep` (a fixed-size steepest-ascent step, then the projection: FGSM, PGD) or
APGD's schedule with momentum and checkpoints (:class:`gradshield.attacks.apgd.APGDStep`).

Semantics (all of them):
- the clean forward pass is computed once; examples already fooled there are returned unchanged
  (``success=True``, size 0) and never attacked;
- every iterate's forward pass also checks success; an example is frozen (and leaves the batch)
  at its first adversarial iterate, so later steps never undo a success;
- an example never fooled returns the point its step rule returns at the end of a run (constant
  step: the final iterate; APGD: the iterate of highest loss) from the run (restart, target class)
  where that point's loss is highest; for one run with a constant step: exactly the usual last
  PGD iterate;
- ``queries`` counts the model evaluations per example: 1 clean + 1 per gradient step + 1 final
  evaluation per run it took part in; without a random start (and without target classes) the
  first gradient step is taken at the clean image (zero perturbation, applied exactly), so the
  clean evaluation IS that step's forward pass and is not repeated (one evaluation fewer).

With ``n_target_classes = k`` (untargeted only) the engine makes ``k`` runs (each with
``restarts``) whose loss is the *targeted* one towards the clean prediction's 2nd, 3rd, ...,
(k+1)-th most likely class (APGD-T, FAB-T in AutoAttack); success stays "misclassified".

A step rule has ``init(space, x, generator)`` (the random start) and ``begin(space, x, delta,
steps, index)``, which returns a stepper for one run over the examples ``index`` with
``step(t, x, delta, values, grad) -> next iterate``, ``select(mask)`` (fooled examples leave)
and ``result(delta, values) -> (point, loss)`` (what the run returns for an example never fooled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradshield.attacks.base import (
    AttackResult,
    attack_loss,
    attack_start,
    check_logits,
    check_loss,
    keep,
    target_classes,
)
from gradshield.attacks.registry import register
from gradshield.errors import GradshieldError
from gradshield.perturbations import FLOW_NORMS, NORMS, Additive, Flow, Space, per_example
from gradshield.validation import check_budget, check_int


def _loss_and_grad(forward, space, x, delta, objective, rows):
    """(per-example loss, its gradient w.r.t. ``delta``, logits) at ``space.apply(x, delta)``;
    ``objective(logits, rows)`` is the loss of the examples ``rows``."""
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(space.apply(x, delta))
        check_logits(logits, x.shape[0])
        values = objective(logits, rows)
        (grad,) = torch.autograd.grad(values.sum(), delta)
    return values.detach(), grad, logits.detach()


def _rows(value, index):
    """A per-example value (N,) restricted to ``index``; floats and 0-dim tensors pass through."""
    return value[index] if isinstance(value, torch.Tensor) and value.dim() == 1 else value


@dataclass(frozen=True)
class ConstantStep:
    """FGSM/PGD's rule: ``delta <- P(delta + steepest ascent step of size step_size)`` (a float or
    an (N,) tensor, in the space's units), from a start drawn uniformly from the ball."""

    step_size: float | torch.Tensor

    def init(self, space: Space, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return space.init(x, random=True, generator=generator)

    def begin(self, space: Space, x: torch.Tensor, delta: torch.Tensor, steps: int,
              index: torch.Tensor) -> _ConstantStepper:
        return _ConstantStepper(space, _rows(self.step_size, index))


@dataclass(frozen=True)
class _ConstantStepper:
    space: Space
    step_size: float | torch.Tensor

    def step(self, t, x, delta, values, grad):
        return self.space.project_feasible(x, self.space.step(x, delta, grad, self.step_size))

    def select(self, mask):
        return _ConstantStepper(self.space.select(mask), _rows(self.step_size, mask))

    def result(self, delta, values):
        return delta, values


def _objective(loss: str, kappa: float, targeted: bool, classes: torch.Tensor,
               labels: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example loss of the examples ``rows`` from their logits."""
    def value(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return attack_loss(logits, classes[rows], targeted=targeted, loss=loss, kappa=kappa,
                           labels=None if labels is None else labels[rows])

    return value


def projected_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, space: Space, *,
                       steps: int, step_size: float | torch.Tensor | None = None, rule=None,
                       random_start: bool = False, restarts: int = 1, targeted: bool = False,
                       loss: str = "ce", kappa: float = 0.0, n_target_classes: int | None = None,
                       generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None) -> AttackResult:
    """Projected steepest ascent of a per-example loss within ``space`` (the engine of every
    gradient attack). Give ``step_size`` (a :class:`ConstantStep`) or a step ``rule``.

    ``step_size`` is in the space's units (a float or (N,) tensor); ``loss`` is ``"ce"``,
    ``"margin"`` (``kappa``: margin cap) or ``"dlr"``. See the module docstring for the result
    semantics and ``n_target_classes``.
    """
    steps = check_int(steps, "steps")
    restarts = check_int(restarts, "restarts")
    if (step_size is None) == (rule is None):
        raise GradshieldError("give step_size (a constant step) or a step rule, not both or neither")
    if rule is None:
        rule = ConstantStep(check_budget(step_size, "step_size"))
    check_loss(loss, targeted, labels)  # (with n_target_classes the labels are y itself)
    if restarts > 1 and not random_start:
        raise GradshieldError("restarts > 1 repeats the same deterministic run; set random_start=True")
    if n_target_classes is not None:
        n_target_classes = check_int(n_target_classes, "n_target_classes")
        if targeted:
            raise GradshieldError("n_target_classes picks the targets itself (an untargeted attack over "
                                  "targeted losses); with targeted=True, y already holds the targets")
    reuse = not random_start and n_target_classes is None  # the first step's forward pass is the clean one
    with attack_start(model, x, y, targeted=targeted, labels=labels, clean=not reuse) as s:
        x, n = s.x, x.shape[0]
        per_example(space.eps, x)  # per-example budgets must have N entries
        objectives = [_objective(loss, kappa, targeted, y, labels)]
        first = None  # (loss, grad, logits) of the first step when it is taken at x itself
        if reuse:
            first = _loss_and_grad(s.forward, space, x, space.init(x), objectives[0], slice(None))
            s.clean(first[2])
        if n_target_classes is not None:
            objectives = [_objective(loss, kappa, True, target, y)
                          for target in target_classes(s.logits, n_target_classes)]
        best = space.init(x)
        best_loss = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
        for run in range(len(objectives) * restarts):
            objective = objectives[run // restarts]
            active = s.remaining()
            if active.numel() == 0:
                break
            xa, sub = x[active], space.select(active)
            delta = rule.init(sub, xa, generator) if random_start else sub.init(xa)
            stepper = rule.begin(sub, xa, delta, steps, active)
            for t in range(steps + 1):
                reused = t == 0 and run == 0 and first is not None  # the clean pass, already evaluated
                if reused:
                    values, grad, logits = (part[active] for part in first)
                elif t < steps:
                    values, grad, logits = _loss_and_grad(s.forward, sub, xa, delta, objective, active)
                else:
                    logits = s.forward(sub.apply(xa, delta))
                    values = objective(logits, active)
                if not reused:
                    s.queries[active] += 1
                fooled = s.fooled(logits, y[active])
                if fooled.any():  # success freezes an example
                    best[active[fooled]] = delta[fooled]
                    best_loss[active[fooled]] = values[fooled]
                    s.success[active[fooled]] = True
                if t == steps:  # the run's point for the others; keep the run where its loss is highest
                    point, score = stepper.result(delta, values)
                    better = ~fooled & (score > best_loss[active])
                    best[active[better]] = point[better]
                    best_loss[active[better]] = score[better]
                    break
                if fooled.any():
                    active, xa, sub, delta, grad, values, stepper = keep(
                        ~fooled, active, xa, sub, delta, grad, values, stepper)
                    if active.numel() == 0:
                        break
                delta = stepper.step(t, xa, delta, values, grad)
        adversarial = space.apply(x, best)
    perturbation = adversarial - x if isinstance(space, Additive) else best
    size = space.size(perturbation)
    return AttackResult(adversarial=adversarial, success=s.success, perturbation_size=size, queries=s.queries,
                        perturbation=perturbation)


def step_size_for(eps, steps: int, step_size, rel_step_size):
    """``step_size`` if given, else ``rel_step_size * eps`` (default ``2.5 / steps``: Madry's rule)."""
    if step_size is not None and rel_step_size is not None:
        raise GradshieldError("give step_size or rel_step_size, not both")
    if step_size is not None:
        return check_budget(step_size, "step_size")
    rel = 2.5 / steps if rel_step_size is None else check_budget(rel_step_size, "rel_step_size")
    return check_budget(eps) * rel


def _constant_steps(model, x, y, space, steps, step_size, rel_step_size, **settings) -> AttackResult:
    steps = check_int(steps, "steps")
    return projected_gradient(model, x, y, space, steps=steps,
                              step_size=step_size_for(space.eps, steps, step_size, rel_step_size), **settings)


@register(space="additive", norms=NORMS, kind="iterative")
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
    return _constant_steps(model, x, y, Additive(norm, eps, l1_top_k=l1_top_k), steps, step_size,
                           rel_step_size, random_start=random_start, restarts=restarts, targeted=targeted,
                           loss=loss, generator=generator, labels=labels)


@register(space="additive", norms=("linf",), kind="single-step")
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
         targeted: bool = False, loss: str = "ce", labels: torch.Tensor | None = None) -> AttackResult:
    """FGSM (Goodfellow et al. 2015): one L-inf sign step of size ``eps``, no random start."""
    return pgd(model, x, y, eps=eps, norm="linf", steps=1, rel_step_size=1.0, targeted=targeted, loss=loss,
               labels=labels)


@register(space="flow", norms=FLOW_NORMS, kind="iterative")
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
    return _constant_steps(model, x, y, Flow(norm, eps, padding=padding), steps, step_size, rel_step_size,
                           random_start=random_start, restarts=restarts, targeted=targeted, loss=loss,
                           generator=generator, labels=labels)


@register(space="flow", norms=FLOW_NORMS, kind="single-step")
def flow_single_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
                     norm: str = "linf", padding: str = "border", targeted: bool = False, loss: str = "ce",
                     labels: torch.Tensor | None = None) -> AttackResult:
    """Single-step flow attack (the flow analogue of FGSM): one steepest step of size ``eps`` pixels."""
    return flow_pgd(model, x, y, eps=eps, norm=norm, steps=1, rel_step_size=1.0, padding=padding,
                    targeted=targeted, loss=loss, labels=labels)
