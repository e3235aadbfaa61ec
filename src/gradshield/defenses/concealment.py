"""The Gradient Concealment Module (GCM) and :func:`conceal`, which inserts it into a model copy.

GCM (Pei et al., "Gradient Concealment: Free Lunch for Defending Adversarial Attacks") is the
parameter-free layer ``y = x + eps * sin(w * x)`` with a huge frequency (``w = 1e20``) and a tiny
amplitude (``eps = 1e-8``). Its output differs from its input by at most ``eps`` (below float32
resolution for most values in [0, 1]), so predictions do not change; its derivative
``1 + eps * w * cos(w * x)`` is about ``+-1e12`` with a sign that changes from one input to the next.

What this means, plainly: in float32, ``w * x`` is a number around 1e18-1e20 whose spacing
(one unit in the last place) is about 1e11-1e12 radians, so ``sin(w * x)`` and ``cos(w * x)`` are
effectively pseudo-random functions of the bits of ``x``: moving ``x`` by one float step draws a new
value. The autograd gradient therefore says nothing about how the loss changes over any distance an
attacker moves (its direction is the true gradient times a random +-1e12 per coordinate), while the
function itself is, to float32 precision, the undefended model. GCM is *gradient masking*: it
defeats attacks that follow autograd, not attacks that approximate the layer by the identity
(BPDA), transfer attacks or gradient-free attacks. :mod:`gradshield.evaluation.diagnostics` detects it.

Placement (``conceal(model, at=...)``):

- ``"front"``: on the [0, 1] input image, before everything else, including the normalisation
  layer of a :class:`~gradshield.models.NormalizedClassifier` (the paper puts GCM before the
  classifier, on the input image). To place it after normalisation instead, name the layer:
  ``at=["normalize"]``.
- a list of sub-module names (as in ``model.named_modules()``, e.g. ``"net.layer1"`` ..
  ``"net.layer4"`` for ResNet-18, ``"net.block1"`` .. ``"net.block3"`` for the compact net; may
  include ``"front"``): GCM is applied to each named module's output (a forward hook, so the state
  dict keeps its keys).
- ``"all"``: after every leaf module (one with no children) whose output is a floating tensor.
  Functional calls (``F.relu`` inside ``forward``) are not modules and get no GCM.

Stacking: each GCM on the forward path multiplies the backward signal by about ``eps * w``
(1e12), so two are ~1e24 and three or more overflow float32 (max 3.4e38) into inf/NaN gradients.
:func:`conceal` warns (:class:`ConcealmentWarning`) when the product of the placements' factors
passes 1e30, and :func:`gradshield.evaluation.diagnostics.gradient_health` reports non-finite gradients as a
flagged finding. Nothing hides them.
"""

from __future__ import annotations

import copy
import difflib
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from gradshield.errors import GradshieldError

FRONT = "front"
ALL = "all"
#: Warn when the stacked gradient factor passes this (float32 overflows at ~3.4e38, and the
#: factor multiplies gradients that are themselves summed over many units).
OVERFLOW_WARN_LOG10 = 30.0


class ConcealmentWarning(UserWarning):
    """GCM placements that will (or did) overflow float32 gradients."""


class GradientConcealment(nn.Module):
    """``x + eps * sin(w * x)``, computed in float32 (or float64 for float64 input).

    Half precision cannot hold ``w * x`` (1e20 * x overflows float16 to inf, sin(inf) = NaN), so the
    layer disables autocast, computes in float32 and casts the result back to the input dtype. In
    float16/bfloat16 the output then equals the input (eps is far below their resolution), so
    predictions are finite and unchanged. The backward pass applies the factor
    ``1 + eps*w*cos(w*x)`` (~1e12) in float32 and casts the gradient back to the input dtype:
    fine in bfloat16 (max 3e38), but float16 (max 65504) turns it into inf - an input gradient
    of a float16 input through GCM is non-finite, which
    :func:`gradshield.evaluation.diagnostics.gradient_health` reports. No parameters, no buffers.
    """

    #: adaptive attacks back-propagate through GCM as the identity (gradshield.attacks.bpda_default)
    bpda_identity = True

    def __init__(self, w: float = 1e20, eps: float = 1e-8) -> None:
        super().__init__()
        w, eps = float(w), float(eps)
        if not (math.isfinite(w) and w > 0):
            raise GradshieldError(f"GCM frequency w must be a finite number > 0, got {w}")
        if not (math.isfinite(eps) and eps >= 0):
            raise GradshieldError(f"GCM amplitude eps must be a finite number >= 0, got {eps}")
        if w >= 3.0e38:
            raise GradshieldError(f"GCM frequency w={w:g} does not fit in float32 (max 3.4e38)")
        self.w = w
        self.eps = eps

    @property
    def gradient_factor(self) -> float:
        """The largest magnitude of the layer's derivative, ``1 + eps * w``."""
        return 1.0 + self.eps * self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise GradshieldError(f"GCM needs a floating-point tensor, got {x.dtype}")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = x.to(compute)
            out = z + self.eps * torch.sin(z * self.w)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"w={self.w:g}, eps={self.eps:g}"


class _ApplyGCM:
    """Forward hook: apply the owner's ``gcm`` attribute to a module's output.

    It looks ``owner.gcm`` up at call time, so replacing that attribute (e.g. BPDA wrapping it,
    :func:`gradshield.attacks.bpda`) affects every placement, and a deep copy of the owner gets
    hooks that point to the copy.
    """

    def __init__(self, owner: nn.Module, name: str, strict: bool) -> None:
        self.owner, self.name, self.strict = owner, name, strict

    def __call__(self, module: nn.Module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return self.owner.gcm(output)
        if self.strict:
            dtype = f" of dtype {output.dtype}" if isinstance(output, torch.Tensor) else ""
            raise GradshieldError(
                f"cannot place GCM after {self.name!r}: its output is {type(output).__name__}"
                f"{dtype}, not a floating-point tensor; choose a module that returns one")
        return None


class ConcealedModel(nn.Module):
    """A model copy with GCM inserted: ``model(front_gcm(x))`` plus hooks after named modules.

    ``placements`` lists where GCM sits (``"front"`` and/or module names of the wrapped copy);
    ``gcm`` is the layer (shared by all placements; it has no state). The wrapped copy is
    ``.model``; its state dict keys are unchanged (hooks, not new sub-modules). ``strict``: a
    placement whose module returns something other than a float tensor is an error (else skipped).
    """

    def __init__(self, model: nn.Module, placements: Sequence[str], gcm: GradientConcealment,
                 *, strict: bool = True) -> None:
        super().__init__()
        self.model = model
        self.gcm = gcm
        self.placements = tuple(placements)
        self.front = FRONT in self.placements
        modules = dict(model.named_modules())
        for name in self.placements:
            if name != FRONT:
                modules[name].register_forward_hook(_ApplyGCM(self, name, strict))

    @property
    def stacked_log10_factor(self) -> float:
        """log10 of the largest gradient factor if every placement lies on one forward path."""
        return len(self.placements) * math.log10(self.gcm.gradient_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.gcm(x) if self.front else x)

    def undefended(self) -> nn.Module:
        """A deep copy of the wrapped model with every GCM hook removed: the model without GCM
        (e.g. the surrogate of a transfer attack). ``self.model`` itself keeps its hooks."""
        plain = copy.deepcopy(self.model)
        for module in plain.modules():
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _ApplyGCM):
                    del module._forward_hooks[key]
        return plain

    def extra_repr(self) -> str:
        shown = ", ".join(self.placements[:6]) + (" ..." if len(self.placements) > 6 else "")
        return f"placements=[{shown}] ({len(self.placements)})"


def _leaf_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if name and next(module.children(), None) is None]


def resolve_placements(model: nn.Module, at: str | Sequence[str]) -> list[str]:
    """Turn ``at`` ("front", "all" or a list of names) into a checked list of placement names."""
    if isinstance(at, str):
        if at == FRONT:
            return [FRONT]
        if at == ALL:
            leaves = _leaf_names(model)
            if not leaves:
                raise GradshieldError("at='all' found no leaf modules in this model")
            return leaves
        at = [at]
    names = list(at)
    if not names:
        raise GradshieldError("conceal(at=[]) places GCM nowhere; pass 'front', 'all' or names")
    modules = dict(model.named_modules())
    for name in names:
        if name == FRONT:
            continue
        if name == ALL:
            raise GradshieldError("'all' cannot be combined with other placements; pass at='all'")
        if not name or name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
            top = [n for n in modules if n and n.count(".") <= 1][:12]
            raise GradshieldError(
                f"no sub-module named {name!r} to place GCM after; "
                f"{f'did you mean {close}? ' if close else ''}names come from "
                f"model.named_modules(), e.g. {top}; or use 'front' / 'all'")
    if len(set(names)) != len(names):
        raise GradshieldError(f"duplicate GCM placements in {names}")
    return names


def conceal(model: nn.Module, at: str | Sequence[str] = FRONT, *, w: float = 1e20,
            eps: float = 1e-8) -> ConcealedModel:
    """A deep copy of ``model`` with GCM at ``at``; the user's model is not modified.

    ``model`` is any classifier taking [0, 1] images (e.g. from :mod:`gradshield.models`).
    ``at``: ``"front"`` (the input image, before normalisation), ``"all"`` (after every leaf
    module) or a list of sub-module names (optionally with ``"front"``). The copy keeps the
    original's train/eval mode. Warns with :class:`ConcealmentWarning` when the stacked gradient
    factor ``(1 + eps*w) ** len(placements)`` passes 1e30 (float32 gradients will overflow).
    """
    if not isinstance(model, nn.Module):
        raise GradshieldError(f"conceal() needs an nn.Module, got {type(model).__name__}")
    names = resolve_placements(model, at)
    gcm = GradientConcealment(w=w, eps=eps)
    # with at="all", leaves whose output is not a float tensor are skipped, not errors
    wrapped = ConcealedModel(copy.deepcopy(model), names, gcm, strict=at != ALL)
    wrapped.train(model.training)
    for copied, original in zip(wrapped.model.modules(), model.modules(), strict=True):
        copied.training = original.training
    if wrapped.stacked_log10_factor > OVERFLOW_WARN_LOG10:
        warnings.warn(
            f"{len(names)} stacked GCM placements multiply gradients by up to "
            f"~1e{wrapped.stacked_log10_factor:.0f} (eps*w = {eps * w:g} each); float32 overflows "
            "at 3.4e38, so input gradients will be inf/NaN. Gradient attacks on this model fail "
            "for that reason alone; gradshield.evaluation.diagnostics.gradient_health reports it",
            ConcealmentWarning, stacklevel=2)
    return wrapped


def concealment_facts(model: nn.Module, x: torch.Tensor) -> dict:
    """What the GCM layer of ``model`` (a :class:`ConcealedModel`) does to the values ``x`` in
    float32: its largest change, the share of values it changes at all, the median size and the
    sign of its gradient factor ``1 + eps*w*cos(w*x)``, and how often moving a value up by one
    float32 step flips that sign."""
    if not isinstance(model, ConcealedModel):
        raise GradshieldError("concealment_facts needs a model made by conceal()")
    gcm = model.gcm
    x = x.detach().float()
    with torch.enable_grad():
        z = x.clone().requires_grad_(True)
        out = gcm(z)
        (factor,) = torch.autograd.grad(out.sum(), z)
        nudged = torch.nextafter(x, torch.full_like(x, 2.0)).requires_grad_(True)
        (factor_next,) = torch.autograd.grad(gcm(nudged).sum(), nudged)
    return {"w": gcm.w, "eps": gcm.eps, "values": int(x.numel()),
            "max_abs_change": float((out.detach() - x).abs().max()),
            "share_values_changed": float((out.detach() != x).float().mean()),
            "median_abs_gradient_factor": float(factor.abs().median()),
            "share_factor_positive": float((factor > 0).float().mean()),
            "share_sign_flips_one_ulp_up": float(((factor > 0) != (factor_next > 0)).float().mean())}
