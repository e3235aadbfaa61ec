"""Attacks: pure functions ``attack(model, x, y, *, targeted=False, **hyper) -> AttackResult``.

Gradient attacks are settings of one projected-gradient engine (:mod:`gradshield.attacks.pgd`)
over the perturbation spaces of :mod:`gradshield.perturbations`.
"""

from gradshield.attacks.adaptive import BPDA, bpda, transfer_attack
from gradshield.attacks.base import AttackResult, attack_loss, is_adversarial, margin
from gradshield.attacks.pgd import fgsm, flow_pgd, flow_single_step, pgd, projected_gradient

__all__ = [
    "BPDA",
    "AttackResult",
    "attack_loss",
    "bpda",
    "fgsm",
    "flow_pgd",
    "flow_single_step",
    "is_adversarial",
    "margin",
    "pgd",
    "projected_gradient",
    "transfer_attack",
]
