"""Adaptive tools for judging a defense that may mask gradients: BPDA and transfer attacks.

- :func:`bpda` (Athalye et al. 2018, Backward Pass Differentiable Approximation) returns a copy
  of a model whose selected sub-modules compute their forward pass unchanged but back-propagate
  as the identity (or as a given differentiable approximation). Any gradient attack run on the
  copy is then an adaptive attack on the original: the forward values are bit-for-bit equal.
- :func:`transfer_attack` crafts adversarials on a surrogate and scores them on the target.

How a defense tells adaptive evaluation what to see through (so that the evaluation code names no
defense): a module whose class sets ``bpda_identity = True`` is what :func:`bpda_default`
replaces by the identity, and a model with an ``undefended()`` method returns, there, itself
without the inference-time defense (the natural surrogate of a transfer attack,
:func:`undefended`). :class:`gradshield.defenses.concealment.GradientConcealment` and
:class:`~gradshield.defenses.concealment.ConcealedModel` do both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, is_adversarial
from gradshield.errors import GradshieldError
from gradshield.utils import eval_mode


class BPDA(nn.Module):
    """Wraps ``module``: forward = ``module(x)``; backward = identity, or the gradient of
    ``approximation(x)`` where given (the straight-through form ``f(x).detach() + g(x) - g(x).detach()``,
    whose value is exactly ``f(x)``)."""

    def __init__(self, module: nn.Module,
                 approximation: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.module = module
        self.approximation = approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.module(x)
        with torch.no_grad():
            out = self.module(x)
        surrogate = x if self.approximation is None else self.approximation(x)
        if surrogate.shape != out.shape:
            what = "the identity" if self.approximation is None else "the approximation"
            raise GradshieldError(
                f"BPDA with {what} needs an output of the module's shape {tuple(out.shape)}, got "
                f"{tuple(surrogate.shape)}; pass approximation= with a differentiable function of that shape")
        return out.detach() + (surrogate - surrogate.detach())

    def extra_repr(self) -> str:
        return "backward=identity" if self.approximation is None else f"backward={self.approximation!r}"


def bpda(model: nn.Module, select: Callable[[nn.Module], bool],
         approximation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of ``model`` whose sub-modules with ``select(module)`` true back-propagate as the
    identity (or as ``approximation``); forward values are unchanged. The original is not modified.

    Raises if nothing is selected (a silent no-op would make an adaptive attack look like one).
    """
    if not isinstance(model, nn.Module):
        raise GradshieldError(f"bpda needs a torch.nn.Module, got {type(model).__name__}")
    wrapped = copy.deepcopy(model)
    if select(wrapped):
        return BPDA(wrapped, approximation)
    count = _wrap_children(wrapped, select, approximation)
    if count == 0:
        raise GradshieldError("bpda: select(module) is true for no sub-module of the model; nothing to "
                              "approximate (check the predicate, e.g. lambda m: isinstance(m, MyLayer))")
    return wrapped


def _wrap_children(parent: nn.Module, select, approximation) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        if select(child):
            setattr(parent, name, BPDA(child, approximation))
            count += 1
        else:
            count += _wrap_children(child, select, approximation)
    return count


def transfer_attack(attack: Callable[..., AttackResult], surrogate: nn.Module, target: nn.Module,
                    x: torch.Tensor, y: torch.Tensor, **hyper) -> AttackResult:
    """Run ``attack(surrogate, x, y, **hyper)``, then score its adversarials on ``target``.

    ``success`` is recomputed from the target's predictions; ``queries`` counts the target's
    evaluations (1 per example; the surrogate's are in ``info["surrogate_queries"]``).
    """
    crafted = attack(surrogate, x, y, **hyper)
    with eval_mode(target), torch.no_grad():
        success = is_adversarial(target(crafted.adversarial), y, bool(hyper.get("targeted", False)))
    return AttackResult(adversarial=crafted.adversarial, success=success,
                        perturbation_size=crafted.perturbation_size,
                        queries=torch.ones_like(crafted.queries), perturbation=crafted.perturbation,
                        info={"surrogate_queries": crafted.queries,
                              "surrogate_success": crafted.success})


def marked_for_bpda(module: nn.Module) -> bool:
    """Whether a defense marked ``module`` (class attribute ``bpda_identity = True``) as one that
    adaptive attacks should back-propagate through as the identity."""
    return bool(getattr(module, "bpda_identity", False))


def bpda_default(model: nn.Module) -> nn.Module | None:
    """:func:`bpda` of every module a defense marked (:func:`marked_for_bpda`); None if none is."""
    if not any(marked_for_bpda(m) for m in model.modules()):
        return None
    return bpda(model, marked_for_bpda)


def undefended(model: nn.Module) -> nn.Module | None:
    """The model without its inference-time defense, where the model provides one
    (``model.undefended()``); None otherwise."""
    method = getattr(model, "undefended", None)
    return method() if callable(method) else None
