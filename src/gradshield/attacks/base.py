"""What every attack shares: the result type, the per-example losses, the set-up and bookkeeping.

Conventions: ``y`` holds the true labels for an untargeted attack and the *target* classes for a
targeted one (``targeted=True``); pass ``labels=`` as well to have targets equal to the labels
rejected. Losses are per example (shape (N,)), oriented so that the attacker *maximises* them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError
from gradshield.utils import eval_mode
from gradshield.validation import check_images, check_labels

LOSSES = ("ce", "margin", "dlr")


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


def target_classes(logits: torch.Tensor, n_target_classes: int) -> list[torch.Tensor]:
    """AutoAttack's target classes: for each rank 2 .. n+1 of the clean logits, that rank's class
    per example (one (N,) tensor per rank)."""
    if n_target_classes >= logits.shape[1]:
        raise GradshieldError(f"n_target_classes = {n_target_classes}, but the model has only "
                              f"{logits.shape[1] - 1} classes besides the predicted one")
    ranked = logits.argsort(1, descending=True)
    return [ranked[:, rank] for rank in range(1, n_target_classes + 1)]


def margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logit[class] - max_{j != class} logit[j]`` per example (the C&W margin)."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def dlr(logits: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020), oriented for the attacker to maximise.

    Untargeted (``labels`` None, ``y`` the labels): ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``;
    targeted (``y`` the targets, ``labels`` the true labels):
    ``-(z_label - z_target) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, with ``z_pi1 >= z_pi2 >= ...`` the
    sorted logits. Invariant to shifting and scaling the logits. Needs 3 (targeted: 4) classes.
    """
    needed = 3 if labels is None else 4
    if logits.shape[1] < needed:
        raise GradshieldError(f"the DLR loss needs at least {needed} classes, the model has "
                              f"{logits.shape[1]}; use loss='ce' or 'margin'")
    top = logits.topk(needed, dim=1).values
    if labels is None:
        scale = top[:, 0] - top[:, 2]
        return -margin(logits, y) / (scale + 1e-12)
    scale = top[:, 0] - (top[:, 2] + top[:, 3]) / 2
    gap = logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
    return -gap / (scale + 1e-12)


def check_loss(loss: str, targeted: bool = False, labels: torch.Tensor | None = None) -> str:
    """``loss`` if it is one of :data:`LOSSES` (a targeted DLR also needs the true ``labels``)."""
    if loss not in LOSSES:
        raise GradshieldError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if loss == "dlr" and targeted and labels is None:
        raise GradshieldError("the targeted DLR loss compares the target with the true label: pass labels=")
    return loss


def attack_loss(logits: torch.Tensor, y: torch.Tensor, *, targeted: bool = False, loss: str = "ce",
                kappa: float = 0.0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example loss the attacker maximises.

    ``ce``: cross-entropy of ``y`` (untargeted) or its negative (targeted, ``y`` = targets).
    ``margin``: ``-margin(y)`` untargeted, ``margin(target)`` targeted, capped at ``kappa``
    (C&W confidence: no gain once the margin exceeds ``kappa``).
    ``dlr``: :func:`dlr` (targeted: ``labels`` = the true labels).
    """
    check_loss(loss, targeted, labels)
    if loss == "ce":
        value = F.cross_entropy(logits, y, reduction="none")
        return -value if targeted else value
    if loss == "margin":
        value = margin(logits, y)
        value = value if targeted else -value
        return value.clamp(max=kappa)
    return dlr(logits, y, labels if targeted else None)


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


def check_logits(logits: torch.Tensor, n: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise GradshieldError(f"the model must return logits of shape (N, classes) = ({n}, K), got {shape}")
    if not torch.isfinite(logits).all():
        raise GradshieldError(
            "the model returned NaN/inf logits on the clean inputs; check the model (float16 under "
            "GCM overflows: run it in float32)")



# --------------------------------------------------------------------------- set-up and bookkeeping


@dataclass
class Start:
    """An attack's starting point (see :func:`attack_start`): the checked images ``x`` (detached),
    ``y``, the model as a channels-last ``forward``, and per example ``success`` (fooled so far;
    after the clean pass: misclassified, or on target) and ``queries`` (model evaluations; 1 after
    the clean pass)."""

    x: torch.Tensor
    y: torch.Tensor
    targeted: bool
    forward: Callable[[torch.Tensor], torch.Tensor]
    logits: torch.Tensor | None = None
    success: torch.Tensor | None = None
    queries: torch.Tensor | None = None

    def clean(self, logits: torch.Tensor) -> None:
        """Record the clean pass (for an attack whose first step's forward pass is the clean one)."""
        check_logits(logits, self.x.shape[0])
        self.logits = logits
        self.success = is_adversarial(logits, self.y, self.targeted)
        self.queries = torch.ones(self.x.shape[0], dtype=torch.long, device=self.x.device)

    def remaining(self) -> torch.Tensor:
        """Indices of the examples not fooled yet."""
        return (~self.success).nonzero().squeeze(1)

    def fooled(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return is_adversarial(logits, classes, self.targeted)


@contextlib.contextmanager
def attack_start(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, targeted: bool = False,
                 labels: torch.Tensor | None = None, clean: bool = True) -> Iterator[Start]:
    """The set-up every attack shares: check the inputs, detach ``x``, feed the model channels-last
    images, hold it in eval mode (each module's own flag restored after) without autograd (an
    attack enables it where it differentiates), and run the clean pass (``clean=False``: the
    attack calls :meth:`Start.clean` with logits it computes itself)."""
    check_attack_inputs(model, x, y, targeted=targeted, labels=labels)
    start = Start(x.detach(), y, targeted, channels_last_forward(model))
    with eval_mode(model), torch.no_grad():
        if clean:
            start.clean(start.forward(start.x))
        yield start


def keep(mask: torch.Tensor, *values):
    """Each per-example value restricted to the examples where ``mask`` is true (or to the
    indices ``mask``): the bookkeeping when fooled examples leave the batch. Tensors with a batch
    dimension are indexed, objects with a ``select`` method (spaces, step rules) are selected,
    anything else (floats, None, 0-dim tensors) passes through. Returns a tuple in the order given."""
    out = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            out.append(value[mask])
        elif hasattr(value, "select"):
            out.append(value.select(mask))
        else:
            out.append(value)
    return tuple(out)
