"""Pure metric functions: predictions, clean accuracy, attack robustness (AR), robust accuracy.

AR (the GCM paper's metric, from RobustART) = share of the clean-correct examples that stay
correct after the attack. Robust accuracy = share of all examples correct after the attack.
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.utils import eval_mode
from gradshield.validation import check_images, check_labels


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Top-1 predicted class per image (model in eval mode, restored afterwards)."""
    check_images(images)
    out = []
    with eval_mode(model):
        for begin in range(0, images.shape[0], batch_size):
            out.append(model(images[begin:begin + batch_size]).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Clean top-1 accuracy in [0, 1]."""
    check_labels(labels, images.shape[0], getattr(getattr(model, "config", None), "num_classes",
                                                  None))
    return float((predict(model, images, batch_size) == labels).float().mean())


def attack_robustness(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """AR: correct-after-attack / correct-before, over the clean-correct examples (NaN if none)."""
    clean_correct = clean_correct.bool()
    if not clean_correct.any():
        return float("nan")
    return float((adv_correct.bool() & clean_correct).sum() / clean_correct.sum())


def robust_accuracy(clean_correct: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """Share of all examples that are correct before and after the attack."""
    return float((adv_correct.bool() & clean_correct.bool()).float().mean())
