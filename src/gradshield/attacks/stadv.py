"""stAdv-style optimisation attack on a per-pixel flow field (Xiao et al. 2018).

Minimises, per example, an objective of the flow ``v`` (pixels) built from
``L_adv = max(z_y - max_{j!=y} z_j, -kappa)`` (targeted: ``max(max_{j!=t} z_j - z_t, -kappa)``)
and the stAdv smoothness loss ``L_flow`` (:func:`flow_smoothness`), balanced by ``c`` one of two
ways (``balance``, :func:`penalized_objective`):

- ``"loss"``: ``c * L_adv + tau * L_flow``: the constant on the adversarial loss, as in C&W and
  stAdv (gradshield's default);
- ``"distance"``: ``L_adv + c * L_flow``: the constant on the distance term, as the FGR paper's
  Eq. 3 writes its optimisation-based attack, ``L(x + delta, t) + c * ||delta||_p`` ("c is a
  chosen constant that balancing the strength and the imperceptibility"); ``tau`` is unused.

The FGR paper says only "balancing parameter c is 10" (Table 1 caption) with stAdv solved by SGD
(Sec. 5.2), so which term carries c is ambiguous; gradshield runs both. There is no hard budget:
the smoothness term keeps the deformation small.

How ``c`` and ``tau`` relate: the minimiser depends only on the ratio ``tau / c``. The stAdv
paper writes ``L_adv + tau' * L_flow`` with ``tau' = 0.05``; the same balance here is
``tau = 0.05 * c`` (0.5 at c = 10). Our default ``tau = 0.05`` (ratio 0.005) is 10x weaker on
smoothness: on the compact CIFAR net (logits scaled by 1/8, so small margins) the paper's ratio
with 50 Adam steps fools only ~4 % more examples than are misclassified clean, against ~58 %
with ours. ``c`` alone also scales the gradient, i.e. the effective SGD learning rate (Adam is
invariant to that scale).
:data:`FGR_PAPER` is the FGR paper's setting (SGD, balance c = 10); the paper's code does not
give the learning rate, steps or tau, so those are our defaults. The paper's L-BFGS solver is
not used: a first-order optimiser runs ``steps`` iterations.
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_start, margin
from gradshield.attacks.registry import register
from gradshield.errors import GradshieldError
from gradshield.perturbations import norm_of
from gradshield.validation import check_int, check_number
from gradshield.warp import PADDING_MODES, warp

OPTIMIZERS = ("sgd", "adam")
BALANCES = ("loss", "distance")
FGR_PAPER = {"optimizer": "sgd", "c": 10.0}


def flow_smoothness(flow: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """stAdv's L_flow per example: sum over pixels p and their 4 neighbours q of
    ``sqrt(||u_p - u_q||^2 + ||v_p - v_q||^2 + eps)`` (each neighbouring pair counted from both
    sides; neighbours outside the image are absent). Flow (N, 2, H, W) in pixels -> (N,)."""
    horizontal = (flow[..., :, 1:] - flow[..., :, :-1]).pow(2).sum(1).add(eps).sqrt()
    vertical = (flow[..., 1:, :] - flow[..., :-1, :]).pow(2).sum(1).add(eps).sqrt()
    return 2 * (horizontal.flatten(1).sum(1) + vertical.flatten(1).sum(1))


def check_balance(balance: str) -> str:
    if balance not in BALANCES:
        raise GradshieldError(f"balance must be one of {BALANCES} (c on the adversarial loss, as "
                              f"stAdv; or on the distance, as the FGR paper's Eq. 3), got {balance!r}")
    return balance


def penalized_objective(logits: torch.Tensor, y: torch.Tensor, flow: torch.Tensor, *, c: float,
                        tau: float, balance: str, kappa: float, targeted: bool) -> torch.Tensor:
    """The per-example objective an optimisation-based flow attack MINIMISES (see the module doc):
    ``c * L_adv + tau * L_flow`` (balance "loss") or ``L_adv + c * L_flow`` ("distance")."""
    gap = margin(logits, y)
    gap = (-gap if targeted else gap).clamp(min=-kappa)
    smooth = flow_smoothness(flow)
    return c * gap + tau * smooth if balance == "loss" else gap + c * smooth


@register(space="flow", norms=("linf",), kind="iterative", bounded=False)
def stadv(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, tau: float = 0.05, c: float = 10.0,
          balance: str = "loss", steps: int = 200, optimizer: str = "adam", lr: float | None = None,
          kappa: float = 0.0, padding: str = "border", targeted: bool = False,
          labels: torch.Tensor | None = None) -> AttackResult:
    """Optimisation-based flow attack; returns per example the smoothest adversarial flow found.

    ``balance``: where ``c`` goes (module doc). ``lr`` in pixels per step for Adam (default
    0.01); for SGD the raw learning rate (default 0.05). ``perturbation_size`` is the largest
    displacement component (L-inf, pixels); ``info["smoothness"]`` holds L_flow of the returned
    flows. ``queries`` = 1 + ``steps``.
    """
    tau = check_number(tau, "tau")
    c = check_number(c, "c", positive=True)
    kappa = check_number(kappa, "kappa")
    steps = check_int(steps, "steps")
    check_balance(balance)
    if optimizer not in OPTIMIZERS:
        raise GradshieldError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if padding not in PADDING_MODES:
        raise GradshieldError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    lr = check_number(lr, "lr", positive=True) if lr is not None else (0.01 if optimizer == "adam" else 0.05)
    with attack_start(model, x, y, targeted=targeted, labels=labels) as s:
        x, forward, success, queries = s.x, s.forward, s.success, s.queries
        n, _, h, w = x.shape
        best = x.new_zeros(n, 2, h, w)
        best_smooth = torch.where(success, 0.0, float("inf")).to(x.dtype)
        active = s.remaining()
        if active.numel():
            xa, ya = x[active], y[active]
            flow = xa.new_zeros(len(active), 2, h, w).requires_grad_(True)
            solver = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([flow], lr=lr)
            for _ in range(steps):
                with torch.enable_grad():
                    out = forward(warp(xa, flow, padding=padding))
                    loss = penalized_objective(out, ya, flow, c=c, tau=tau, balance=balance,
                                               kappa=kappa, targeted=targeted)
                    smooth = flow_smoothness(flow)
                    (flow.grad,) = torch.autograd.grad(loss.sum(), flow)
                fooled = s.fooled(out.detach(), ya)
                better = fooled & (smooth.detach() < best_smooth[active])
                if better.any():
                    best[active[better]] = flow.detach()[better]
                    best_smooth[active[better]] = smooth.detach()[better]
                    success[active[better]] = True
                solver.step()
            queries[active] += steps
        adversarial = warp(x, best, padding=padding)
    return AttackResult(adversarial=adversarial, success=success, perturbation_size=norm_of(best, "linf"),
                        queries=queries, perturbation=best,
                        info={"smoothness": flow_smoothness(best)})
