"""Attacks: pure functions ``attack(model, x, y, *, targeted=False, **hyper) -> AttackResult``.

Gradient attacks are settings of one projected-gradient engine (:mod:`gradshield.attacks.pgd`)
over the perturbation spaces of :mod:`gradshield.perturbations`. Each attack registers its suite
metadata next to its code (:mod:`gradshield.attacks.registry`); importing this package registers
them all.
"""

from gradshield.attacks.adaptive import BPDA, bpda, transfer_attack
from gradshield.attacks.apgd import APGDStep, apgd
from gradshield.attacks.base import AttackResult, attack_loss, dlr, is_adversarial, margin
from gradshield.attacks.cw import cw_l2
from gradshield.attacks.evolution import evolution_strategies, evolution_strategies_penalized
from gradshield.attacks.fab import fab
from gradshield.attacks.noise import random_noise
from gradshield.attacks.pgd import ConstantStep, fgsm, flow_pgd, flow_single_step, pgd, projected_gradient
from gradshield.attacks.registry import AttackInfo, attack_info, registered
from gradshield.attacks.square import square
from gradshield.attacks.stadv import FGR_PAPER, flow_smoothness, stadv

__all__ = [
    "BPDA",
    "FGR_PAPER",
    "APGDStep",
    "AttackInfo",
    "AttackResult",
    "ConstantStep",
    "apgd",
    "attack_info",
    "attack_loss",
    "bpda",
    "cw_l2",
    "dlr",
    "evolution_strategies",
    "evolution_strategies_penalized",
    "fab",
    "fgsm",
    "flow_pgd",
    "flow_single_step",
    "flow_smoothness",
    "is_adversarial",
    "margin",
    "pgd",
    "projected_gradient",
    "random_noise",
    "registered",
    "square",
    "stadv",
    "transfer_attack",
]
