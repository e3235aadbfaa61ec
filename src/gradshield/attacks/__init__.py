"""Attacks: pure functions ``attack(model, x, y, *, targeted=False, **hyper) -> AttackResult``.

Gradient attacks are settings of one projected-gradient engine (:mod:`gradshield.attacks.pgd`)
over the perturbation spaces of :mod:`gradshield.perturbations`.
"""

from gradshield.attacks.adaptive import BPDA, bpda, transfer_attack
from gradshield.attacks.base import AttackResult, attack_loss, is_adversarial, margin
from gradshield.attacks.cw import cw_l2
from gradshield.attacks.evolution import evolution_strategies
from gradshield.attacks.pgd import fgsm, flow_pgd, flow_single_step, pgd, projected_gradient
from gradshield.attacks.square import square
from gradshield.attacks.stadv import FGR_PAPER, flow_smoothness, stadv

__all__ = [
    "BPDA",
    "FGR_PAPER",
    "AttackResult",
    "attack_loss",
    "bpda",
    "cw_l2",
    "evolution_strategies",
    "fgsm",
    "flow_pgd",
    "flow_single_step",
    "flow_smoothness",
    "is_adversarial",
    "margin",
    "pgd",
    "projected_gradient",
    "square",
    "stadv",
    "transfer_attack",
]
