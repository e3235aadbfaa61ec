"""The threat model: perturbation spaces that know how to start, apply, step and project.

Two spaces share one interface, so every projected-gradient attack is the same loop:

- :class:`Additive` (*intensity*): ``x' = clip(x + delta, 0, 1)``; ``eps`` in the [0, 1] pixel
  scale, measured in the L-inf, L2 or L1 norm over all C*H*W coordinates of one example.
- :class:`Flow` (*location*): ``x' = warp(x, v)`` with a per-pixel flow ``v`` (N, 2, H, W) in
  **pixels** (:func:`gradshield.warp.warp`). ``norm="linf"`` bounds every component of every
  pixel's displacement (``|v_x|, |v_y| <= eps`` pixels); ``norm="l2"`` bounds the Euclidean norm
  of the whole field (all 2*H*W numbers) of one example.

``eps`` is a float or a tensor of shape (N,) (one budget per example). Projections onto the
L-inf, L2 and L1 balls are exact Euclidean projections (L1: the sort-based simplex projection of
Duchi et al. 2008, not a rescaling). Steepest-ascent steps: sign (L-inf), normalised gradient
(L2), and a sparse top-k step (L1; the k coordinates with the largest gradient magnitude that can
still move in the ascent direction share the step, as in SLIDE, Tramèr & Boneh 2019).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from gradshield.errors import GradshieldError
from gradshield.utils import random_tensor
from gradshield.validation import check_budget
from gradshield.warp import PADDING_MODES, warp

NORMS = ("linf", "l2", "l1")
FLOW_NORMS = ("linf", "l2")


# --------------------------------------------------------------------------- budgets and norms


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS) -> str:
    """Return ``norm`` if it is one of ``allowed``, else raise a GradshieldError naming the options."""
    if norm not in allowed:
        raise GradshieldError(f"unknown norm {norm!r}; choose one of {allowed}")
    return norm


def per_example(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or (N,) tensor as a tensor shaped (N, 1, ..., 1) broadcastable against ``like``."""
    n = like.shape[0]
    if isinstance(value, torch.Tensor):
        value = value.to(device=like.device, dtype=like.dtype)
        if value.dim() == 1 and value.shape[0] != n:
            raise GradshieldError(f"per-example value has {value.shape[0]} entries for {n} examples")
        value = value.expand(n) if value.dim() == 0 else value
        return value.reshape(n, *([1] * (like.dim() - 1)))
    return torch.full((n,) + (1,) * (like.dim() - 1), float(value), dtype=like.dtype, device=like.device)


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of ``delta`` (N, ...) in ``norm``, shape (N,). Reduces over the
    non-batch dimensions in place (no flattening copy of a channels-last tensor)."""
    if norm not in NORMS:
        raise GradshieldError(f"unknown norm {norm!r}; choose one of {NORMS}")
    if delta.dim() == 1:  # one value per example: its size in every norm
        return delta.abs()
    dims = tuple(range(1, delta.dim()))
    if norm == "linf":
        if math.prod(delta.shape[1:]) == 0:  # empty rows (amax has no identity)
            return delta.new_zeros(delta.shape[0])
        return delta.abs().amax(dim=dims)
    if norm == "l2":
        return torch.linalg.vector_norm(delta, 2, dim=dims)
    return delta.abs().sum(dim=dims)


# --------------------------------------------------------------------------- exact projections


def project_linf(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Nearest point of the L-inf ball of radius ``eps`` (N, 1, ..., 1): coordinate-wise clamp."""
    return torch.maximum(torch.minimum(delta, eps), -eps)


def project_l2(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Nearest point of the L2 ball: rescale the rows longer than ``eps`` onto the sphere."""
    size = norm_of(delta, "l2").view_as(eps)
    tiny = torch.finfo(delta.dtype).tiny
    scale = torch.where(size > eps, eps / size.clamp_min(tiny), torch.ones_like(size))
    return delta * scale


def project_l1(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Exact nearest point of the L1 ball (sort-based simplex projection, Duchi et al. 2008).

    Rows already inside the ball are returned unchanged. The threshold is computed in float64.
    Only the nonzero magnitudes can set the threshold (a zero never passes the prefix condition of
    a row outside the ball), so only the largest ``k`` = most nonzeros in a row are sorted (top-k):
    sparse rows, e.g. L1 steps that move a few coordinates, cost O(d) instead of O(d log d). The
    soft-threshold itself is applied in the input's dtype (within one rounding of float64).
    """
    n = delta.shape[0]
    flat = delta.reshape(n, -1)
    radius = eps.reshape(n).to(torch.float64)
    magnitude = flat.abs()
    outside = magnitude.sum(1, dtype=torch.float64) > radius
    if not outside.any():
        return delta
    k = max(1, int((magnitude != 0).sum(1).max()))
    mu = magnitude.topk(k, dim=1).values if k < flat.shape[1] else magnitude.sort(
        dim=1, descending=True).values
    mu = mu.to(torch.float64)
    cumulative = mu.cumsum(1)
    ranks = torch.arange(1, mu.shape[1] + 1, dtype=torch.float64, device=delta.device)
    positive = mu * ranks > cumulative - radius[:, None]
    rho = positive.sum(1).clamp_min(1)  # the condition holds for a prefix of the sorted row
    theta = (cumulative.gather(1, (rho - 1)[:, None]).squeeze(1) - radius) / rho
    theta = torch.where(outside, theta.clamp_min(0), torch.zeros_like(theta)).to(delta.dtype)
    projected = (magnitude - theta[:, None]).clamp_min_(0).mul_(flat.sign())
    return torch.where(outside[:, None], projected, flat).view_as(delta)


def project_l1_box(delta: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Exact nearest point of the intersection of the L1 ball of radius ``eps`` and the image box
    (``0 <= x + delta <= 1``), the projection of APGD-L1 (AutoAttack).

    Per coordinate the answer is ``sign(v) * clip(|v| - lam, 0, room)`` (``room``: how far the pixel
    can move in ``v``'s direction); ``lam >= 0`` is the smallest value whose L1 size is within
    ``eps``, found exactly from the sorted breakpoints of that piecewise-linear size (float64).
    """
    n = delta.shape[0]
    v = delta.reshape(n, -1).to(torch.float64)
    base = x.reshape(n, -1).to(torch.float64)
    radius = per_example(eps, delta).reshape(n).to(torch.float64)
    room = torch.where(v > 0, 1 - base, base).clamp_min(0)
    magnitude = v.abs()
    clipped = torch.minimum(magnitude, room)  # lam = 0: the box projection alone
    outside = clipped.sum(1) > radius
    if outside.any():
        # size(lam) = sum clip(|v| - lam, 0, room): slope -1 per coordinate between |v| - room and |v|
        points = torch.cat([magnitude - room, magnitude], 1)
        order = points.argsort(1)
        points = points.gather(1, order)
        slope = torch.cat([-torch.ones_like(v), torch.ones_like(v)], 1).gather(1, order).cumsum(1)
        size = room.sum(1, keepdim=True) + torch.cat(
            [torch.zeros_like(radius[:, None]), (slope[:, :-1] * points.diff(dim=1)).cumsum(1)], 1)
        k = (size > radius[:, None]).sum(1).clamp(1, points.shape[1] - 1)  # size[k - 1] > eps >= size[k]
        at = (k - 1)[:, None]
        lam = points.gather(1, at) + (size.gather(1, at) - radius[:, None]) / (
            -slope.gather(1, at)).clamp_min(1)
        lam = torch.where(outside[:, None], lam.clamp_min(0), torch.zeros_like(lam))
        clipped = torch.minimum((magnitude - lam).clamp_min(0), room)
    return (v.sign() * clipped).to(delta.dtype).view_as(delta)


_PROJECTIONS = {"linf": project_linf, "l2": project_l2, "l1": project_l1}


def project(delta: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Exact Euclidean projection of each example of ``delta`` onto its ``norm`` ball of radius ``eps``."""
    return _PROJECTIONS[check_norm(norm)](delta, per_example(eps, delta))


# --------------------------------------------------------------------------- steps and sampling


def steepest_ascent(grad: torch.Tensor, step_size: torch.Tensor, norm: str, *, top_k: int = 1,
                    feasible: torch.Tensor | None = None) -> torch.Tensor:
    """The step of size ``step_size`` (N, 1, ..., 1) in ``norm`` that most increases a linear loss.

    L-inf: ``step * sign(g)``; L2: ``step * g / ||g||``; L1: ``step / k`` times the sign of the
    gradient on the ``top_k`` coordinates of largest ``|g|`` (``feasible``, a boolean mask, excludes
    coordinates that cannot move in the ascent direction). A zero gradient gives a zero step.
    """
    if norm == "linf":
        return step_size * grad.sign()
    if norm == "l2":
        size = norm_of(grad, "l2").view_as(step_size)
        return grad * (step_size / size.clamp_min(torch.finfo(grad.dtype).tiny))
    if norm == "l1":
        n = grad.shape[0]
        score = grad.abs() if feasible is None else grad.abs() * feasible
        score = score.reshape(n, -1)
        k = max(1, min(int(top_k), score.shape[1]))
        values, index = score.topk(k, dim=1)
        direction = torch.zeros_like(score).scatter_(1, index, (values > 0).to(score.dtype))
        return direction.view_as(grad) * grad.sign() * (step_size / k)
    raise GradshieldError(f"unknown norm {norm!r}; choose one of {NORMS}")


def sample_ball(shape: tuple[int, ...], eps: torch.Tensor, norm: str, generator: torch.Generator | None,
                like: torch.Tensor) -> torch.Tensor:
    """Points drawn uniformly from each example's ``norm`` ball of radius ``eps`` (N, 1, ..., 1)."""
    n, d = shape[0], math.prod(shape[1:])
    if norm == "linf":
        return (2 * random_tensor(shape, like, generator, "uniform") - 1) * eps
    if norm == "l2":
        direction = random_tensor((n, d), like, generator, "normal")
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:  # l1: normalised exponentials with random signs are uniform on the L1 sphere
        magnitude = random_tensor((n, d), like, generator, "exponential")
        signs = torch.where(random_tensor((n, d), like, generator, "uniform") < 0.5, -1.0, 1.0).to(like.dtype)
        direction = magnitude / magnitude.sum(1, keepdim=True) * signs
    radius = random_tensor((n, 1), like, generator, "uniform") ** (1.0 / d)
    return (direction * radius).view(shape) * eps


# --------------------------------------------------------------------------- the two spaces


@dataclass(frozen=True)
class Additive:
    """Additive noise ``x' = clip(x + delta, 0, 1)`` with ``||delta||_norm <= eps`` ([0, 1] pixel scale).

    ``l1_top_k``: coordinates moved per L1 step (None: 1 % of the coordinates, SLIDE's 99th
    percentile; 1: ART's single-coordinate L1 step).
    """

    norm: str
    eps: float | torch.Tensor
    l1_top_k: int | None = None
    kind = "additive"

    def __post_init__(self) -> None:
        check_norm(self.norm)
        object.__setattr__(self, "eps", check_budget(self.eps))
        if self.l1_top_k is not None and int(self.l1_top_k) < 1:
            raise GradshieldError(f"l1_top_k must be >= 1 (or None for 1 % of the coordinates), got "
                                  f"{self.l1_top_k}")

    def select(self, index: torch.Tensor) -> Additive:
        """The same space restricted to the examples ``index`` (per-example budgets follow)."""
        return _select(self, index)

    def init(self, x: torch.Tensor, *, random: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero perturbation, or one drawn uniformly from the ball (then clipped to the image box)."""
        if not random:
            return torch.zeros_like(x)
        delta = sample_ball(tuple(x.shape), per_example(self.eps, x), self.norm, generator, x)
        return (x + delta).clamp(0, 1) - x

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``clip(x + delta, 0, 1)``; the gradient w.r.t. ``delta`` is that w.r.t. the image.

        The attacks keep ``x + delta`` inside [0, 1]; the clip only removes the rounding of
        ``x + (clip(x + d) - x)``. Its gradient passes straight through, so a pixel at 0 or 1
        keeps its gradient (as when differentiating w.r.t. the adversarial image, the way
        torchattacks/ART/foolbox do) instead of losing it whenever rounding lands past the bound.
        """
        image = x + delta
        return image + (image.clamp(0, 1) - image).detach()

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection onto the ``norm`` ball of radius ``eps``."""
        return project(delta, self.eps, self.norm)

    def project_feasible(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Ball projection, then clipping of ``x + delta`` to [0, 1] (stays inside the ball)."""
        return (x + self.project(delta)).clamp(0, 1) - x

    def step(self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor,
             step_size: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent step on ``delta``; the L1 step skips coordinates stuck at 0 or 1."""
        feasible = None
        top_k = 1
        if self.norm == "l1":
            current = x + delta  # can move up where below 1, down where above 0
            feasible = torch.where(grad > 0, current < 1, (current > 0) & (grad < 0))
            top_k = self.l1_top_k or max(1, round(0.01 * grad[0].numel()))
        return delta + steepest_ascent(grad, per_example(step_size, grad), self.norm, top_k=top_k,
                                       feasible=feasible)

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example size of ``delta`` in this space's norm ([0, 1] pixel scale)."""
        return norm_of(delta, self.norm)


@dataclass(frozen=True)
class Flow:
    """Spatial transformation ``x' = warp(x, v)``, ``v`` (N, 2, H, W) in pixels, ``||v||_norm <= eps``.

    ``norm="linf"``: every component of every pixel's displacement is at most ``eps`` pixels;
    ``norm="l2"``: the Euclidean norm of the whole field of one example is at most ``eps`` pixels.
    """

    norm: str
    eps: float | torch.Tensor
    padding: str = "border"
    kind = "flow"

    def __post_init__(self) -> None:
        check_norm(self.norm, FLOW_NORMS)
        object.__setattr__(self, "eps", check_budget(self.eps))
        if self.padding not in PADDING_MODES:
            raise GradshieldError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")

    def select(self, index: torch.Tensor) -> Flow:
        return _select(self, index)

    def init(self, x: torch.Tensor, *, random: bool = False,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero flow, or a flow drawn uniformly from the ball."""
        shape = (x.shape[0], 2, *x.shape[2:])
        zero = x.new_zeros(shape)
        if not random:
            return zero
        return sample_ball(shape, per_example(self.eps, zero), self.norm, generator, zero)

    def apply(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return warp(x, flow, padding=self.padding)

    def project(self, flow: torch.Tensor) -> torch.Tensor:
        return project(flow, self.eps, self.norm)

    def project_feasible(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Warped images stay in [0, 1] by construction, so this is the ball projection."""
        return self.project(flow)

    def step(self, x: torch.Tensor, flow: torch.Tensor, grad: torch.Tensor,
             step_size: torch.Tensor) -> torch.Tensor:
        return flow + steepest_ascent(grad, per_example(step_size, grad), self.norm)

    def size(self, flow: torch.Tensor) -> torch.Tensor:
        """Per-example size of the flow in this space's norm (pixels)."""
        return norm_of(flow, self.norm)


Space = Additive | Flow


def _select(space, index: torch.Tensor):
    if isinstance(space.eps, torch.Tensor) and space.eps.dim() == 1:
        return dataclasses.replace(space, eps=space.eps[index.to(space.eps.device)])
    return space
