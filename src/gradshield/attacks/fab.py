"""FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
attack"), with AutoAttack's targeted variant FAB-T: a minimum-norm attack, L-inf and L2.

Each iteration linearises the model at the current point ``x1``: for the chosen class ``k`` the
decision boundary ``f_k - f_y = 0`` becomes a hyperplane. FAB projects both ``x1`` and the clean
image ``x0`` onto it within the image box (the smallest ``d`` in the attack's norm,
:func:`project_to_hyperplane`) and moves to ``(1 - alpha) (x1 + eta d1) + alpha (x0 + eta d2)``
with ``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` (biased towards the clean image, so the
result stays small), clipped to the box. Once ``x1`` is adversarial it is recorded if smaller than
the best so far and pulled back towards ``x0`` by ``beta``. Untargeted FAB picks ``k`` as the
class with the nearest linearised boundary (one backward pass per class); FAB-T
(``n_target_classes = k``) makes ``k`` runs, run ``r`` always towards the clean prediction's
(r+1)-th most likely class (one backward pass per iteration), and counts any misclassification
as success, as AutoAttack. Settings as the reference: ``eta = 1.05``, ``beta = 0.9``, ``alpha_max
= 0.1``, 100 iterations; later restarts start from a random point at ``start_radius``.

Result: per example the smallest adversarial found over all runs (``perturbation_size`` in the
attack's norm, [0, 1] pixel scale); a suite counts success within its budget. ``queries`` = 1
clean + 2 per iteration per run (the linearisation's forward pass and the success check).
"""

from __future__ import annotations

import torch
from torch import nn

from gradshield.attacks.base import AttackResult, attack_start, check_logits, target_classes
from gradshield.attacks.registry import register
from gradshield.errors import GradshieldError
from gradshield.perturbations import check_norm, norm_of
from gradshield.utils import random_tensor
from gradshield.validation import check_int, check_number

NORMS = ("linf", "l2")


def project_to_hyperplane(point: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row (N, D) the smallest ``d`` in ``norm`` ("linf" or "l2") with ``w . (point + d) = b`` and
    ``0 <= point + d <= 1``; where the box cannot reach the hyperplane, the box point nearest to it
    along that direction.

    Along the direction that raises ``w . d`` towards ``b``, coordinate ``i`` moves by ``min(r,
    room_i)`` (L-inf) or ``min(lam |w_i|, room_i)`` (L2); the radius ``r`` (``lam``) is found exactly
    from the sorted points where coordinates saturate (``room_i``: distance to the box face).
    """
    gap = b - (w * point).sum(1)
    w = w * gap.sign()[:, None]                       # orient w so that w . d must rise by |gap|
    gap = gap.abs()
    a = w.abs()
    room = torch.where(w > 0, 1 - point, point).clamp_min(0)
    weight = a if norm == "linf" else a * a           # the slope each unsaturated coordinate adds
    saturate = room if norm == "linf" else torch.where(a > 0, room / a, torch.full_like(a, float("inf")))
    order = saturate.argsort(1)
    saturate, weight, gain = saturate.gather(1, order), weight.gather(1, order), (a * room).gather(1, order)
    gained = gain.cumsum(1)                           # w . d from the saturated coordinates
    rest = weight.sum(1, keepdim=True) - weight.cumsum(1)  # slope of the others
    reach = gained + torch.where(rest > 0, saturate * rest, torch.zeros_like(rest))
    k = (reach < gap[:, None]).sum(1, keepdim=True)   # the first breakpoint that reaches the plane
    inside = k < point.shape[1]
    before = (k - 1).clamp_min(0)
    gained_before = torch.where(k > 0, gained.gather(1, before), torch.zeros_like(gap[:, None]))
    slope = torch.where(k > 0, rest.gather(1, before), weight.sum(1, keepdim=True))
    scale = (gap[:, None] - gained_before) / slope.clamp_min(torch.finfo(slope.dtype).tiny)
    scale = torch.where(inside, scale, torch.full_like(scale, float("inf")))
    move = torch.minimum(scale if norm == "linf" else scale * a, room)
    return torch.where((gap[:, None] > 0) & (a > 0), w.sign() * move, torch.zeros_like(move))


def _boundaries(forward, x1, y, target):
    """(df, dg): logit differences ``f_k - f_y`` (N, K') at ``x1`` and their input gradients
    (N, K', D); K' = 1 towards ``target``, else all classes (the own class at +inf distance)."""
    x1 = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(x1)
        check_logits(logits, x1.shape[0])
        own = logits.gather(1, y[:, None])
        if target is not None:
            diff = logits.gather(1, target[:, None]) - own
            (grad,) = torch.autograd.grad(diff.sum(), x1)
            return diff.detach(), grad.reshape(x1.shape[0], 1, -1)
        diff = logits - own
        grads = [torch.autograd.grad(diff[:, k].sum(), x1, retain_graph=k < diff.shape[1] - 1)[0]
                 for k in range(diff.shape[1])]
    df = diff.detach().scatter(1, y[:, None], float("inf"))
    return df, torch.stack(grads, 1).reshape(x1.shape[0], diff.shape[1], -1)


@register(space="additive", norms=NORMS, kind="iterative", bounded=False)
def fab(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "linf", steps: int = 100,
        n_target_classes: int | None = 9, restarts: int = 1, start_radius: float | None = None,
        alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, targeted: bool = False,
        generator: torch.Generator | None = None, labels: torch.Tensor | None = None) -> AttackResult:
    """FAB-T (default, ``n_target_classes = 9`` as AutoAttack's standard version on CIFAR-10) or
    untargeted FAB (``n_target_classes=None``); a minimum-norm attack (no ``eps``): returns per
    example the smallest adversarial it found. ``restarts > 1`` needs ``start_radius`` (the norm
    of the random start's offset; AutoAttack uses ``eps / 2``). ``targeted=True`` (reaching given
    targets) is not supported: FAB-T's targets only steer an untargeted attack.
    """
    check_norm(norm, NORMS)
    steps, restarts = check_int(steps, "steps"), check_int(restarts, "restarts")
    alpha_max, eta, beta = (check_number(v, name, positive=True) for v, name in
                            ((alpha_max, "alpha_max"), (eta, "eta"), (beta, "beta")))
    if targeted:
        raise GradshieldError("fab attacks untargeted (FAB-T's targets only steer it); use targeted=False "
                              "and n_target_classes, or a targeted pgd/apgd")
    if restarts > 1 and start_radius is None:
        raise GradshieldError("restarts > 1 start from random points: give start_radius "
                              "(AutoAttack: eps / 2)")
    if start_radius is not None:
        start_radius = check_number(start_radius, "start_radius")
    if n_target_classes is not None:
        n_target_classes = check_int(n_target_classes, "n_target_classes")
    with attack_start(model, x, y, targeted=False, labels=labels) as s:
        x0_all = s.x
        targets = [None] if n_target_classes is None else target_classes(s.logits, n_target_classes)
        best = x0_all.clone()
        best_size = torch.where(s.success, 0.0, float("inf")).to(x.dtype)
        active = s.remaining()
        if active.numel():
            x0, ya = x0_all[active], y[active]
            flat0 = x0.reshape(len(active), -1)
            for ranked in targets:
                target = None if ranked is None else ranked[active]
                for restart in range(restarts):
                    x1 = x0.clone()
                    if restart > 0:
                        x1 = (x0 + _random_offset(x0, norm, start_radius, generator)).clamp(0, 1)
                    for _ in range(steps):
                        df, dg = _boundaries(s.forward, x1, ya, target)
                        dual = dg.abs().sum(2) if norm == "linf" else dg.norm(dim=2)  # the dual norm
                        distance = df.abs() / (dual + 1e-12)
                        pick = distance.argmin(1)
                        rows = torch.arange(len(active), device=x.device)
                        w = dg[rows, pick]
                        flat1 = x1.reshape(len(active), -1)
                        b = -df[rows, pick] + (w * flat1).sum(1)
                        both = project_to_hyperplane(torch.cat([flat1, flat0]), torch.cat([w, w]),
                                                     torch.cat([b, b]), norm)
                        d1, d2 = both[:len(active)], both[len(active):]
                        a1 = norm_of(d1, norm).clamp_min(1e-8)
                        a2 = norm_of(d2, norm).clamp_min(1e-8)
                        alpha = (a1 / (a1 + a2)).clamp(0, alpha_max)[:, None]
                        flat1 = ((flat1 + eta * d1) * (1 - alpha) + (flat0 + eta * d2) * alpha).clamp(0, 1)
                        x1 = flat1.view_as(x0)
                        logits = s.forward(x1)
                        s.queries[active] += 2
                        fooled = s.fooled(logits, ya)
                        if fooled.any():
                            size = norm_of(x1 - x0, norm)
                            better = fooled & (size < best_size[active])
                            best[active[better]] = x1[better]
                            best_size[active[better]] = size[better]
                            x1 = torch.where(fooled.view(-1, 1, 1, 1), x0 + (x1 - x0) * beta, x1)
    perturbation = best - x0_all
    return AttackResult(adversarial=best, success=best_size.isfinite(),
                        perturbation_size=norm_of(perturbation, norm), queries=s.queries,
                        perturbation=perturbation)


def _random_offset(x0: torch.Tensor, norm: str, radius: float, generator) -> torch.Tensor:
    """A random offset of ``norm`` size ``radius`` (AutoAttack's FAB restarts)."""
    if norm == "linf":
        t = 2 * random_tensor(tuple(x0.shape), x0, generator) - 1
    else:
        t = random_tensor(tuple(x0.shape), x0, generator, "normal")
    return t / norm_of(t, norm).clamp_min(1e-12).view(-1, 1, 1, 1) * radius
