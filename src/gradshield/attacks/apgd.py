"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): a step rule for the one projected-gradient engine.

The engine (:func:`gradshield.attacks.pgd.projected_gradient`) keeps success freezing, the
best points, restarts, target classes and query counting; :class:`APGDStep` only decides the next
iterate. L-inf and L2 (the paper's Algorithm 1):

- step size ``eta`` starts at ``2 * eps``; each step is ``z = P(x + eta * steepest(grad))``,
  then ``x <- P(x + a (z - x) + (1 - a) (x - x_prev))`` with momentum ``a = 0.75`` (``a = 1`` on
  the first step);
- checkpoints after 22 % of the iterations, then at intervals shrinking by 3 % down to 6 % of
  them; at a checkpoint an example's step size is halved, and it restarts from its best point
  (highest loss so far, and that point's gradient), if (1) the loss rose on at most ``rho = 0.75``
  of the steps since the last checkpoint, or (2) its step size was not halved at the last
  checkpoint and its best loss has not risen since;
- the first step of the first checkpoint interval compares the loss with the starting point's
  (the paper's rule; the reference code compares that first loss with 0, an indexing quirk).

L1 (AutoAttack's APGD-L1, following the reference code): a sparse step (the coordinates whose
|gradient| is in the top ``k`` share ``eta`` in L1, ``k`` adapted to the sparsity of the best point,
starting at 20 % of them), the exact projection onto the L1 ball intersected with the image box
(:func:`gradshield.perturbations.project_l1_box`), no momentum, ``eta`` starting at ``eps``; every
4 % of the iterations the step size is reset to ``eps`` and the iterate to the best point where the
best point got sparser (by more than 5 %), else divided by 1.5 (never below ``eps / 10``); the
random start is Gaussian noise projected onto that set. AutoAttack's standard L1 version also
shrinks ``eps`` from 3 ``eps`` over the first 60 % of the iterations ("use_largereps"); this does not.

An example never fooled returns its highest-loss point of the run (the reference returns the clean
image). ``queries``: 1 clean + (``steps`` + 1) per run, as PGD.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from gradshield.attacks.base import AttackResult
from gradshield.attacks.pgd import projected_gradient
from gradshield.attacks.registry import register
from gradshield.errors import GradshieldError
from gradshield.perturbations import NORMS, Additive, Space, per_example, project_l1_box
from gradshield.utils import random_tensor
from gradshield.validation import check_int, check_number

#: The checkpoint schedule as fractions of the iterations: first interval, shrink, minimum.
CHECKPOINTS = (0.22, 0.03, 0.06)
L1_CHECK_EVERY = 0.04
L1_SPARSITY = 0.2        # initial fraction of coordinates an L1 step moves
L1_SHRINK = 1.5          # L1 step-size divisor at a checkpoint without sparser best point
L1_MIN_STEP = 10.0       # L1 step size stays >= eps / L1_MIN_STEP


@dataclass(frozen=True)
class APGDStep:
    """APGD's step rule (see the module docstring). ``rho``: the fraction of loss increases below
    which a checkpoint halves the step; ``momentum``: the weight ``a`` of the new step."""

    rho: float = 0.75
    momentum: float = 0.75

    def init(self, space: Space, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if _is_l1(space):
            return project_l1_box(random_tensor(tuple(x.shape), x, generator, "normal"), x, space.eps)
        return space.init(x, random=True, generator=generator)

    def begin(self, space: Space, x: torch.Tensor, delta: torch.Tensor, steps: int, index: torch.Tensor):
        eps = per_example(space.eps, x).reshape(-1)
        if _is_l1(space):
            return _L1Stepper.start(space, x, eps, steps)
        return _Stepper.start(space, eps, steps, self.rho, self.momentum)


def _is_l1(space: Space) -> bool:
    return isinstance(space, Additive) and space.norm == "l1"


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example choice: rows of ``a`` where ``mask`` (N,), else rows of ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


@dataclass
class _Best:
    """Per example the highest-loss point of the run so far and its gradient."""

    delta: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    loss: torch.Tensor | None = None

    def update(self, delta, grad, values) -> None:
        if self.loss is None:
            self.delta, self.grad, self.loss = delta, grad, values
            return
        better = values > self.loss
        self.delta = _where(better, delta, self.delta)
        self.grad = _where(better, grad, self.grad)
        self.loss = torch.where(better, values, self.loss)

    def select(self, mask) -> _Best:
        if self.loss is None:
            return self
        return _Best(self.delta[mask], self.grad[mask], self.loss[mask])


@dataclass
class _Stepper:
    """APGD L-inf/L2 state over the examples of one run."""

    space: Space
    eps: torch.Tensor
    eta: torch.Tensor
    rho: float
    momentum: float
    interval: int            # iterations to the next checkpoint
    shrink: int
    minimum: int
    since: int = 0           # iterations since the last checkpoint
    best: _Best = dataclasses.field(default_factory=_Best)
    previous: torch.Tensor | None = None  # the iterate the last step started from
    last: torch.Tensor | None = None      # the last loss
    increases: torch.Tensor | None = None
    halved: torch.Tensor | None = None    # halved at the last checkpoint
    best_at_check: torch.Tensor | None = None

    @classmethod
    def start(cls, space, eps, steps, rho, momentum):
        first, shrink, minimum = (max(int(f * steps), 1) for f in CHECKPOINTS)
        return cls(space, eps, 2 * eps, rho, momentum, first, shrink, minimum)

    def select(self, mask) -> _Stepper:
        rows = {name: getattr(self, name)[mask] for name in
                ("eps", "eta", "previous", "last", "increases", "halved", "best_at_check")
                if getattr(self, name) is not None}
        return dataclasses.replace(self, space=self.space.select(mask), best=self.best.select(mask), **rows)

    def result(self, delta, values):
        self.best.update(delta, delta, values)
        return self.best.delta, self.best.loss

    def step(self, t, x, delta, values, grad):
        self.best.update(delta, grad, values)
        if t == 0:
            self.increases = torch.zeros_like(values, dtype=torch.long)
            self.halved = torch.ones_like(values, dtype=torch.bool)
            self.best_at_check = values
        else:
            self.increases = self.increases + (values > self.last)
            self.since += 1
            if self.since == self.interval:
                delta, grad = self._checkpoint(delta, grad)
        self.last = values
        previous = delta if self.previous is None else self.previous
        a = 1.0 if t == 0 else self.momentum
        z = self.space.project_feasible(x, self.space.step(x, delta, grad, self.eta))
        new = self.space.project_feasible(x, delta + a * (z - delta) + (1 - a) * (delta - previous))
        self.previous = delta
        return new

    def _checkpoint(self, delta, grad):
        oscillating = self.increases <= self.interval * self.rho
        stalled = ~self.halved & (self.best_at_check >= self.best.loss)
        halve = oscillating | stalled
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        delta = _where(halve, self.best.delta, delta)
        grad = _where(halve, self.best.grad, grad)
        self.halved, self.best_at_check = halve, self.best.loss
        self.increases = torch.zeros_like(self.increases)
        self.since, self.interval = 0, max(self.interval - self.shrink, self.minimum)
        return delta, grad


@dataclass
class _L1Stepper:
    """APGD-L1 state over the examples of one run (AutoAttack's sparse step and schedule)."""

    eps: torch.Tensor
    eta: torch.Tensor
    sparsity: torch.Tensor    # fraction of coordinates a step moves
    previous_l0: torch.Tensor
    interval: int
    since: int = 0
    best: _Best = dataclasses.field(default_factory=_Best)

    @classmethod
    def start(cls, space, x, eps, steps):
        d = x[0].numel()
        return cls(eps, eps.clone(), torch.full_like(eps, L1_SPARSITY), torch.full_like(eps, float(d)),
                   max(int(L1_CHECK_EVERY * steps), 1))

    def select(self, mask) -> _L1Stepper:
        return dataclasses.replace(self, eps=self.eps[mask], eta=self.eta[mask], sparsity=self.sparsity[mask],
                                   previous_l0=self.previous_l0[mask], best=self.best.select(mask))

    def result(self, delta, values):
        self.best.update(delta, delta, values)
        return self.best.delta, self.best.loss

    def step(self, t, x, delta, values, grad):
        self.best.update(delta, grad, values)
        if t > 0:
            self.since += 1
            if self.since == self.interval:
                delta, grad = self._checkpoint(delta, grad)
        n = grad.shape[0]
        magnitude = grad.abs().reshape(n, -1)
        d = magnitude.shape[1]
        rank = ((1 - self.sparsity) * d).clamp(0, d - 1).long()
        threshold = magnitude.sort(1).values.gather(1, rank[:, None])
        direction = (grad.reshape(n, -1) * (magnitude >= threshold)).sign()
        step = direction / (direction.abs().sum(1, keepdim=True) + 1e-10) * self.eta[:, None]
        return project_l1_box(delta + step.view_as(delta), x, self.eps)

    def _checkpoint(self, delta, grad):
        d = delta[0].numel()
        l0 = (self.best.delta != 0).reshape(delta.shape[0], -1).sum(1).to(self.eta.dtype)
        sparser = l0 / self.previous_l0.clamp_min(1) < 0.95
        self.sparsity = l0 / d / L1_SHRINK
        self.eta = torch.where(sparser, self.eps, self.eta / L1_SHRINK)
        self.eta = torch.minimum(torch.maximum(self.eta, self.eps / L1_MIN_STEP), self.eps)
        self.previous_l0 = l0
        self.since = 0
        return _where(sparser, self.best.delta, delta), _where(sparser, self.best.grad, grad)


@register(space="additive", norms=NORMS, kind="iterative")
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor, norm: str = "linf",
         steps: int = 100, restarts: int = 1, loss: str = "ce", n_target_classes: int | None = None,
         rho: float = 0.75, momentum: float = 0.75, random_start: bool = True, targeted: bool = False,
         generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> AttackResult:
    """APGD in the L-inf, L2 or L1 ball of radius ``eps`` ([0, 1] pixel scale), ``steps`` iterations.

    ``loss``: ``"ce"`` (APGD-CE), ``"dlr"`` (APGD-DLR) or ``"margin"``. ``n_target_classes = k``:
    APGD-T, ``k`` runs with the targeted loss towards the clean prediction's 2nd ... (k+1)-th
    class (AutoAttack's standard version: ``loss="dlr"``, ``k = 9`` on CIFAR-10), success counted as
    misclassification; ``targeted=True`` instead attacks the targets ``y`` (the DLR loss then needs
    ``labels=``). Each run starts from a random point (``random_start=False``: from the clean
    image).
    """
    check_number(rho, "rho")
    check_number(momentum, "momentum")
    if not 0 < momentum <= 1:
        raise GradshieldError(f"momentum is the weight of the new step, in (0, 1]; got {momentum}")
    space = Additive(norm, eps)
    steps = check_int(steps, "steps")
    return projected_gradient(model, x, y, space, steps=steps, rule=APGDStep(rho, momentum),
                              random_start=random_start, restarts=restarts, targeted=targeted, loss=loss,
                              n_target_classes=n_target_classes, generator=generator, labels=labels)

