"""What every attack shares: the result type, the per-example losses, input checks and bookkeeping.

Conventions: ``y`` holds the true labels for an untargeted attack and the *target* classes for a
targeted one (``targeted=True``); pass ``labels=`` as well to have targets equal to the labels
rejected. Losses are per example (shape (N,)), oriented so that the attacker *maximises* them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError
from gradshield.validation import check_images, check_labels

LOSSES = ("ce", "margin")


@dataclass
class AttackResult:
    """Per-example outcome of an attack.

    - ``adversarial`` (N, C, H, W): the best adversarial found per example (the clean image where
      the attack failed to move it, e.g. an example misclassified from the start);
    - ``success`` (N,) bool: the model is fooled on ``adversarial`` (untargeted: prediction != y;
      targeted: prediction == target);
    - ``perturbation_size`` (N,) float: size of ``perturbation`` in the attack's norm ([0, 1] pixel
      scale for additive attacks, pixels for flow attacks);
    - ``queries`` (N,) int: forward (+ backward) evaluations of the model spent on each example;
    - ``perturbation``: the additive delta (``adversarial - x``) or the flow field (N, 2, H, W).
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    perturbation_size: torch.Tensor
    queries: torch.Tensor
    perturbation: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean())


# --------------------------------------------------------------------------- losses


def margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logit[class] - max_{j != class} logit[j]`` per example (the C&W margin)."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def attack_loss(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False, kind: str = "ce",
                kappa: float = 0.0) -> torch.Tensor:
    """Per-example loss the attacker maximises.

    ``ce``: cross-entropy of ``y`` (untargeted) or its negative (targeted, ``y`` = targets).
    ``margin``: ``-margin(y)`` untargeted, ``margin(target)`` targeted, capped at ``kappa``
    (C&W confidence: no gain once the margin exceeds ``kappa``).
    """
    if kind == "ce":
        loss = F.cross_entropy(logits, y, reduction="none")
        return -loss if targeted else loss
    if kind == "margin":
        value = margin(logits, y)
        value = value if targeted else -value
        return value.clamp(max=kappa)
    raise GradshieldError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def is_adversarial(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Untargeted: top-1 != y; targeted: top-1 == y (the target)."""
    prediction = logits.argmax(1)
    return prediction == y if targeted else prediction != y


# --------------------------------------------------------------------------- input checks


def channels_last_forward(model: Callable[[torch.Tensor], torch.Tensor]
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` as a function that feeds it channels-last images on the CPU, where oneDNN's
    convolutions and pooling are fastest (measured 1.4-1.6x faster forward + backward on the
    compact net). Values equal ``model(images)`` up to float rounding; nothing about the model
    or the caller's tensors changes. Other devices and non-image inputs pass through."""
    def forward(images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4 and images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images)

    return forward


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, targeted: bool = False,
                        labels: torch.Tensor | None = None) -> None:
    """Images in [0, 1] without NaN, integer labels of matching length, a model, sane targets."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise GradshieldError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_images(x)
    check_labels(y, x.shape[0], name="targets" if targeted else "labels")
    if y.device != x.device:
        raise GradshieldError(f"labels are on {y.device} but images on {x.device}; move both to one device")
    if labels is not None:
        if not targeted:
            raise GradshieldError("labels= is only for targeted attacks (y then holds the targets)")
        check_labels(labels, x.shape[0])
        same = labels.to(y.device) == y
        if same.any():
            raise GradshieldError(
                f"{int(same.sum())} target(s) equal the true label (first at index "
                f"{int(same.nonzero()[0])}); a targeted attack needs a target class different from "
                "the label, e.g. (labels + 1) % num_classes")


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise GradshieldError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise GradshieldError(f"{name} must be a number, got {type(value).__name__}") from err
    if value != value or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise GradshieldError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_logits(logits: torch.Tensor, n: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise GradshieldError(f"the model must return logits of shape (N, classes) = ({n}, K), got {shape}")
    if not torch.isfinite(logits).all():
        raise GradshieldError(
            "the model returned NaN/inf logits on the clean inputs; check the model (float16 under "
            "GCM overflows: run it in float32)")

