"""Random noise of the attack's size: the baseline every attack should beat."""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_start, check_logits
from gradshield.attacks.registry import register
from gradshield.perturbations import NORMS, Additive


@register(space="additive", norms=NORMS, kind="noise")
def random_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
                 norm: str = "linf", targeted: bool = False, generator: torch.Generator | None = None,
                 labels: torch.Tensor | None = None) -> AttackResult:
    """One point drawn uniformly from the ``norm`` ball of radius ``eps`` ([0, 1] pixel scale),
    clipped to the image box. ``queries`` = 1 (the noisy image; the clean pass is not needed)."""
    space = Additive(norm, eps)
    with attack_start(model, x, y, targeted=targeted, labels=labels, clean=False) as s:
        delta = space.project_feasible(s.x, space.init(s.x, random=True, generator=generator))
        adversarial = space.apply(s.x, delta)
        logits = s.forward(adversarial)  # the only model evaluation
        check_logits(logits, x.shape[0])
        success = s.fooled(logits, s.y)
    perturbation = adversarial - s.x
    return AttackResult(adversarial=adversarial, success=success, perturbation_size=space.size(perturbation),
                        queries=torch.ones_like(success, dtype=torch.long), perturbation=perturbation)
