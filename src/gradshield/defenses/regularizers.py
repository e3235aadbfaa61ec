"""Gradient penalties for training: input gradient (IGR) and flow gradient (FGR) regularisation.

Both are pure functions of ``(model, x, y)`` that run ONE forward pass and return the batch-mean
cross-entropy together with the penalty, built with ``create_graph=True`` so that the penalty's
parameter gradient contains the second-order (double backpropagation) term.

Definitions (per example ``i``, loss ``l_i = CE(model(x_i), y_i)``; the penalty is the MEAN over
the batch, so the batch size never rescales lambda):

- IGR: ``||d l_i / d x_i||^2``, summed over C, H, W, with ``x`` in the [0, 1] pixel scale.
- FGR: ``||d l_i(I(x_i, v)) / d v at v = 0||^2``, summed over H, W and both flow components.
  At the identity the bilinear warp's derivative is the forward difference (see
  :mod:`gradshield.warp`), so the flow gradient equals the closed form
  ``sum_c dl/dx_c * (x_c(p + e) - x_c(p))`` (:func:`gradshield.warp.flow_gradient_closed_form`);
  the penalty uses that closed form (no warp in the graph; identical values, cheaper).

Units of the flow gradient: the flow ``v`` can be measured in pixels or in ``grid_sample``
normalised coordinates (align_corners=True, the FGR paper's code). Since ``v_px = v_norm *
(size - 1) / 2``, ``dl/dv_norm = dl/dv_px * (size - 1) / 2`` (W for the x component, H for y), so
the penalty in normalised units is ``((size - 1) / 2)^2`` = 240.25 times the pixel one at 32 px.

Per-example gradients are taken as the gradient of the SUMMED per-example losses. With
BatchNorm in train mode the examples of a batch are coupled through the batch statistics, so
this also contains O(1/batch) cross-example terms, exactly as in the paper's code (which
differentiates the batch-mean loss); in eval mode or without BatchNorm it is exactly per example.

Relation to the paper's public code (xpf/Flow-Gradient-Regularization): it penalises
``mean_i ||d(mean_j l_j)/d v_i||^2 = mean_i ||d l_i/d v_i||^2 / B^2`` with B = 128, so its
``--fgr_lamb`` equals our ``lam`` (normalised units) times 128^2: see :func:`paper_fgr_lambda`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.errors import GradshieldError
from gradshield.warp import flow_gradient_closed_form, normalized_to_pixels, warp

FLOW_UNITS = ("normalized", "pixels")
PAPER_BATCH_SIZE = 128


@dataclass(frozen=True)
class PenalizedLoss:
    """The batch-mean cross-entropy and the batch-mean squared-gradient penalty (both scalars,
    differentiable w.r.t. the model's parameters, the penalty through its second-order term)."""

    loss: torch.Tensor
    penalty: torch.Tensor

    def total(self, lam: float) -> torch.Tensor:
        return self.loss + lam * self.penalty


def paper_fgr_lambda(paper_lam: float, batch_size: int = PAPER_BATCH_SIZE) -> float:
    """Convert the paper code's ``--fgr_lamb`` (penalty on the gradient of the batch-MEAN loss,
    batch ``batch_size``) into this module's per-example ``lam`` in normalised units."""
    return paper_lam / batch_size**2


def _check_unit(unit: str) -> None:
    if unit not in FLOW_UNITS:
        raise GradshieldError(f"flow unit must be one of {FLOW_UNITS}, got {unit!r}")


def _pixel_to_unit_scale(height: int, width: int, unit: str, like: torch.Tensor) -> torch.Tensor:
    """Factor turning a flow GRADIENT in pixels into one in ``unit``: (N, 2, 1, 1) broadcastable."""
    _check_unit(unit)
    if unit == "pixels":
        return torch.ones(1, 2, 1, 1, dtype=like.dtype, device=like.device)
    factors = [normalized_to_pixels(1.0, width), normalized_to_pixels(1.0, height)]  # x, y
    return torch.tensor(factors, dtype=like.dtype, device=like.device).view(1, 2, 1, 1)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) results up to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _squared_norm_mean(grad: torch.Tensor) -> torch.Tensor:
    return _at_least_float32(grad).pow(2).sum(dim=(1, 2, 3)).mean()


def _per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_at_least_float32(model(x)), y, reduction="none")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses (N,) and ``d l_i / d x_i`` (N, C, H, W) in the [0, 1] pixel scale."""
    x = x.detach().requires_grad_(True)
    losses = _per_example_losses(model, x, y)
    (grad,) = torch.autograd.grad(losses.sum(), x, create_graph=create_graph)
    return losses, grad


def flow_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unit: str = "pixels",
                  create_graph: bool = False, method: str = "closed_form",
                  padding: str = "border") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses (N,) and ``d l_i(I(x_i, v)) / d v`` at v = 0, shape (N, 2, H, W).

    ``unit``: the flow unit the gradient is taken with respect to ("pixels" or "normalized").
    ``method``: "closed_form" (input gradient x forward differences, border padding) or "warp"
    (autograd through :func:`gradshield.warp.warp` with a zero flow, as the paper's code does).
    """
    n, _, h, w = x.shape
    if method == "closed_form":
        if padding != "border":
            raise GradshieldError("the closed-form flow gradient assumes border padding; "
                                  "use method='warp' for padding='zeros'")
        losses, grad_x = input_gradient(model, x, y, create_graph=create_graph)
        grad = flow_gradient_closed_form(x.detach(), grad_x)
    elif method == "warp":
        flow = torch.zeros(n, 2, h, w, dtype=x.dtype, device=x.device, requires_grad=True)
        losses = _per_example_losses(model, warp(x.detach(), flow, padding=padding), y)
        (grad,) = torch.autograd.grad(losses.sum(), flow, create_graph=create_graph)
    else:
        raise GradshieldError(f"method must be 'closed_form' or 'warp', got {method!r}")
    return losses, grad * _pixel_to_unit_scale(h, w, unit, grad)


def igr_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PenalizedLoss:
    """Cross-entropy and the IGR penalty ``mean_i ||d l_i / d x_i||_2^2`` ([0, 1] pixel scale)."""
    losses, grad = input_gradient(model, x, y, create_graph=True)
    return PenalizedLoss(losses.mean(), _squared_norm_mean(grad))


def fgr_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                unit: str = "normalized") -> PenalizedLoss:
    """Cross-entropy and the FGR penalty ``mean_i ||d l_i / d v_i at v = 0||_2^2`` with the flow
    in ``unit`` ("normalized": grid_sample units, align_corners=True, as the paper; or "pixels")."""
    losses, grad = flow_gradient(model, x, y, unit=unit, create_graph=True)
    return PenalizedLoss(losses.mean(), _squared_norm_mean(grad))


def flow_random_start(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                      *, unit: str = "normalized", padding: str = "border") -> torch.Tensor:
    """Warp ``x`` by an i.i.d. Gaussian flow of standard deviation ``sigma`` (in ``unit``) per
    pixel and component, as the FGR paper's random start (sigma 0.01 normalised = 0.155 px at 32
    px). Returns a detached image in [0, 1]. ``sigma = 0`` returns ``x`` unchanged."""
    _check_unit(unit)
    if sigma < 0:
        raise GradshieldError(f"random-start sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x.detach()
    n, _, h, w = x.shape
    noise = torch.randn(n, 2, h, w, generator=generator, dtype=torch.float32)
    noise = noise.to(device=x.device, dtype=x.dtype)
    if unit == "normalized":
        scale = torch.tensor([normalized_to_pixels(sigma, w), normalized_to_pixels(sigma, h)],
                             dtype=x.dtype, device=x.device).view(1, 2, 1, 1)
    else:
        scale = torch.full((1, 2, 1, 1), sigma, dtype=x.dtype, device=x.device)
    return warp(x.detach(), noise * scale, padding=padding).clamp(0, 1).detach()
