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

Two ways to differentiate the penalty w.r.t. the parameters (``method``):

- ``"exact"``: double backpropagation (``create_graph=True``), as the paper's code. The forward
  pass runs under :class:`gradshield.defenses.second_order.second_order_kernels`, whose
  second-order passes for convolutions, max pooling, train-mode BatchNorm and exact GELU are
  cheaper than PyTorch's and mathematically identical.
- ``"finite_difference"``: both penalties are ``P = mean_i ||A_i g_i||^2`` with ``g = dL/dx`` and
  ``A_i`` fixed by ``x_i`` (the identity for IGR, the forward differences for FGR), so
  ``dP/dtheta = 2 d/dh [dL(x + h U)/dtheta] at h = 0`` with ``U_i = A_i^T A_i g_i``: a
  directional derivative of the ordinary parameter gradient along ``U`` (Finlay & Oberman 2019,
  "Scaleable input gradient regularization"). It is taken as a one-sided difference, the whole batch moving
  along ``U`` by a step whose RMS L2 length per example is ``fd_step`` ([0, 1] pixel scale): one
  extra forward/backward pass instead of a second-order graph. The penalty's VALUE is exact and
  the extra pass does not update BatchNorm running statistics. Its parameter gradient converges
  to the exact one (error ~ fd_step) only where the input gradient is smooth in ``x`` (the
  tests check it on the trained compact net with average pooling). With max pooling (the compact
  net's default) flat regions of 8-bit images can put exact ties in pooling windows; where the
  step breaks such a tie the parameter gradient changes route (double backpropagation takes the
  first maximum), and the finite difference converges to a one-sided derivative, or diverges
  where the gradient jumps, not to the exact penalty gradient. Hence
  ``"exact"`` is the default; ``"finite_difference"`` is a variant to validate per model (its
  step now costs about what an exact one does on the compact net, `results/performance-amd-avx512-bf16.md`).

Relation to the paper's public code (xpf/Flow-Gradient-Regularization): it penalises
``mean_i ||d(mean_j l_j)/d v_i||^2 = mean_i ||d l_i/d v_i||^2 / B^2`` with B = 128, so its
``--fgr_lamb`` equals our ``lam`` (normalised units) times 128^2: see :func:`paper_fgr_lambda`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradshield.defenses.second_order import enabled as second_order_enabled
from gradshield.defenses.second_order import second_order_kernels
from gradshield.errors import GradshieldError
from gradshield.utils import draw_rows
from gradshield.warp import (
    flow_gradient_adjoint,
    flow_gradient_closed_form,
    normalized_to_pixels,
    warp,
)

FLOW_UNITS = ("normalized", "pixels")
#: Sums a tensor over the ranks of a data-parallel run (see ``global_sum`` of the penalties).
GlobalSum = Callable[[torch.Tensor], torch.Tensor]
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


def paper_igr_lambda(paper_lam: float, batch_size: int = PAPER_BATCH_SIZE) -> float:
    """The FGR paper's IGR lambda (Eq. 5, the NON-squared norm ``lam * ||d L / d x||_2``) as this
    module's per-example ``lam`` for ``igr_penalty(norm="l2")``, ASSUMING the paper computes it as
    its code computes FGR: ``mean_i ||d(mean_j l_j)/d x_i||_2 = mean_i ||d l_i/d x_i||_2 / B``.
    (The authors' public code has no IGR; this is gradshield's reading, stated where used.)"""
    return paper_lam / batch_size


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


def _per_example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        second_order: bool = False) -> torch.Tensor:
    """``second_order``: the losses will be differentiated twice (gradshield's own passes where
    :func:`gradshield.defenses.second_order.enabled`)."""
    with second_order_kernels() if second_order and second_order_enabled() else contextlib.nullcontext():
        return F.cross_entropy(_at_least_float32(model(x)), y, reduction="none")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   create_graph: bool = False, retain_graph: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses (N,) and ``d l_i / d x_i`` (N, C, H, W) in the [0, 1] pixel scale.
    ``retain_graph``: keep the losses' graph for a later backward pass to the parameters."""
    x = x.detach().requires_grad_(True)
    losses = _per_example_losses(model, x, y, second_order=create_graph)
    (grad,) = torch.autograd.grad(losses.sum(), x, create_graph=create_graph,
                                  retain_graph=retain_graph or create_graph)
    return losses, grad


def flow_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unit: str = "pixels",
                  create_graph: bool = False, retain_graph: bool = False,
                  method: str = "closed_form", padding: str = "border"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
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
        losses, grad_x = input_gradient(model, x, y, create_graph=create_graph,
                                        retain_graph=retain_graph)
        grad = flow_gradient_closed_form(x.detach(), grad_x)
    elif method == "warp":
        flow = torch.zeros(n, 2, h, w, dtype=x.dtype, device=x.device, requires_grad=True)
        losses = _per_example_losses(model, warp(x.detach(), flow, padding=padding), y,
                                     second_order=create_graph)
        (grad,) = torch.autograd.grad(losses.sum(), flow, create_graph=create_graph,
                                      retain_graph=retain_graph or create_graph)
    else:
        raise GradshieldError(f"method must be 'closed_form' or 'warp', got {method!r}")
    return losses, grad * _pixel_to_unit_scale(h, w, unit, grad)


PENALTY_METHODS = ("exact", "finite_difference")
#: Default finite-difference step: L2 length of the input perturbation ([0, 1] pixel scale).
DEFAULT_FD_STEP = 0.01


def check_penalty_method(method: str, fd_step: float) -> None:
    """``method`` one of :data:`PENALTY_METHODS`, ``fd_step`` a finite number > 0."""
    if method not in PENALTY_METHODS:
        raise GradshieldError(f"penalty method must be one of {PENALTY_METHODS}, got {method!r}")
    if not (fd_step > 0 and fd_step == fd_step and fd_step != float("inf")):
        raise GradshieldError(f"fd_step must be a finite number > 0, got {fd_step!r}")


@contextlib.contextmanager
def _batchnorm_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm still normalises with the batch's statistics but leaves its running
    statistics and batch counter exactly as they were (for extra forward passes)."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
              else None) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module, _, _ in saved:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum, tracked in saved:
            module.momentum = momentum
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)


def _finite_difference_penalty(model: nn.Module, x: torch.Tensor, losses: torch.Tensor,
                               y: torch.Tensor, grad: torch.Tensor, direction: torch.Tensor,
                               fd_step: float, global_sum: GlobalSum | None = None) -> torch.Tensor:
    """The penalty ``mean_i ||grad_i||^2`` as a tensor whose value is exact and whose parameter
    gradient is the one-sided finite difference of ``2/N d/dh dL(x + h U)/dtheta``.

    ``losses``: the per-example losses at ``x`` (graph kept); ``grad``: the penalised gradient
    (detached); ``direction``: ``U = A^T A g`` in input space (detached, like ``x``). The whole
    batch moves along ``U`` with ``h`` such that the step's RMS L2 length per example is
    ``fd_step`` (one step for the batch keeps the cross-example BatchNorm terms exact).
    ``global_sum``: ``x`` is one rank's share of a data-parallel batch; the step is set by the
    whole batch (its example count and the norm of its ``U``), as one process would set it."""
    n = x.shape[0]
    value = _squared_norm_mean(grad.detach())
    if global_sum is None:
        total, examples = float(_at_least_float32(direction).norm()), n
    else:
        squared = _at_least_float32(direction.detach()).double().pow(2).sum()
        squared, examples = global_sum(torch.stack([squared, squared.new_tensor(float(n))]))
        total, examples = float(squared.sqrt()), round(float(examples))
    if total == 0.0 or total != total or total == float("inf"):  # no gradient to penalise
        return value + 0.0 * losses.sum()
    h = fd_step * examples**0.5 / total
    with _batchnorm_statistics_frozen(model):
        moved = _per_example_losses(model, (x.detach() + h * direction).detach(), y)
    surrogate = (moved.sum() - losses.sum()) * (2.0 / (n * h))
    return value + (surrogate - surrogate.detach())


IGR_NORMS = ("squared", "l2")


def igr_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "exact",
                fd_step: float = DEFAULT_FD_STEP, norm: str = "squared",
                global_sum: GlobalSum | None = None) -> PenalizedLoss:
    """Cross-entropy and the IGR penalty ``mean_i ||d l_i / d x_i||_2^2`` ([0, 1] pixel scale);
    ``norm="l2"``: the non-squared ``mean_i ||d l_i / d x_i||_2`` (the FGR paper's Eq. 5, exact
    method only). ``method``: "exact" (double backpropagation) or "finite_difference" (see the
    module doc). ``global_sum``: see :func:`fgr_penalty`."""
    check_penalty_method(method, fd_step)
    if norm not in IGR_NORMS:
        raise GradshieldError(f"IGR norm must be one of {IGR_NORMS}, got {norm!r}")
    if norm == "l2" and method != "exact":
        raise GradshieldError("the non-squared IGR norm (norm='l2') needs method='exact'")
    if method == "exact":
        losses, grad = input_gradient(model, x, y, create_graph=True)
        if norm == "l2":  # the tiny offset keeps the derivative of the norm finite at 0
            sq = _at_least_float32(grad).pow(2).sum(dim=(1, 2, 3))
            return PenalizedLoss(losses.mean(), (sq + 1e-24).sqrt().mean())
        return PenalizedLoss(losses.mean(), _squared_norm_mean(grad))
    losses, grad = input_gradient(model, x, y, retain_graph=True)
    penalty = _finite_difference_penalty(model, x, losses, y, grad, grad, fd_step, global_sum)
    return PenalizedLoss(losses.mean(), penalty)


def fgr_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, unit: str = "normalized",
                method: str = "exact", fd_step: float = DEFAULT_FD_STEP,
                global_sum: GlobalSum | None = None) -> PenalizedLoss:
    """Cross-entropy and the FGR penalty ``mean_i ||d l_i / d v_i at v = 0||_2^2`` with the flow
    in ``unit`` ("normalized": grid_sample units, align_corners=True, as the paper; or "pixels").
    ``method``: "exact" (double backpropagation) or "finite_difference" (see the module doc).
    ``global_sum``: when ``x`` is one rank's share of a data-parallel batch, a function summing a
    tensor over the ranks (the finite-difference step is then that of the whole batch; the
    exact method needs none: BatchNorm over the global batch couples the shares)."""
    check_penalty_method(method, fd_step)
    if method == "exact":
        losses, grad = flow_gradient(model, x, y, unit=unit, create_graph=True)
        return PenalizedLoss(losses.mean(), _squared_norm_mean(grad))
    losses, flow_grad = flow_gradient(model, x, y, unit=unit, retain_graph=True)  # S A g, in unit
    scale = _pixel_to_unit_scale(*x.shape[-2:], unit, flow_grad)
    direction = flow_gradient_adjoint(x.detach(), flow_grad * scale)  # A^T S^2 A g, input space
    penalty = _finite_difference_penalty(model, x, losses, y, flow_grad, direction, fd_step,
                                         global_sum)
    return PenalizedLoss(losses.mean(), penalty)


def flow_random_start(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                      *, unit: str = "normalized", padding: str = "border") -> torch.Tensor:
    """Warp ``x`` by an i.i.d. Gaussian flow of standard deviation ``sigma`` (in ``unit``) per
    pixel and component, as the FGR paper's random start (sigma 0.01 normalised = 0.155 px at 32
    px). Returns a detached image in [0, 1], in ``x``'s memory layout (channels-last stays
    channels-last). ``sigma = 0`` returns ``x`` unchanged."""
    _check_unit(unit)
    if sigma < 0:
        raise GradshieldError(f"random-start sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x.detach()
    n, _, h, w = x.shape
    noise = draw_rows(lambda k: torch.randn(k, 2, h, w, generator=generator, dtype=torch.float32), n,
                      generator)  # a rank's rows of the global batch's flows with a ShardGenerator
    noise = noise.to(device=x.device, dtype=x.dtype)
    if unit == "normalized":
        scale = torch.tensor([normalized_to_pixels(sigma, w), normalized_to_pixels(sigma, h)],
                             dtype=x.dtype, device=x.device).view(1, 2, 1, 1)
    else:
        scale = torch.full((1, 2, 1, 1), sigma, dtype=x.dtype, device=x.device)
    return warp(x.detach(), noise * scale, padding=padding).clamp(0, 1).detach()  # x's layout
