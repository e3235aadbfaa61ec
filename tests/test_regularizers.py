"""IGR and FGR penalties: values and parameter gradients against float64 finite differences,
the flow gradient against its closed form and torch's grid_sample, units and batch invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradshield.defenses.regularizers import (
    fgr_penalty,
    flow_gradient,
    flow_random_start,
    igr_penalty,
    input_gradient,
    paper_fgr_lambda,
)
from gradshield.errors import GradshieldError
from gradshield.warp import flow_gradient_closed_form, warp

SIZE = 5  # 5 px: the affine_grid identity points (-1, -.5, 0, .5, 1) are exact in binary


def smooth_model(seed: int = 0, size: int = SIZE) -> nn.Module:
    """A small float64 CNN with smooth activations (softplus, tanh) and no pooling kinks."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * size * size, 5)).double()
    return model


def batch(n: int = 3, seed: int = 1, size: int = SIZE):
    gen = torch.Generator().manual_seed(seed)
    # smooth-ish images with distinct neighbours so the forward differences are not zero
    x = torch.rand(n, 3, size, size, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=gen)
    return x, y


def per_example_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def test_input_gradient_matches_central_differences():
    model, (x, y) = smooth_model(), batch()
    _, grad = input_gradient(model, x, y)
    h, n, d = 1e-6, x.shape[0], x[0].numel()
    steps = h * torch.eye(d, dtype=x.dtype).view(d, 1, *x.shape[1:])  # (d, 1, C, H, W)
    xs = (x[None] + torch.cat([steps, -steps])).reshape(-1, *x.shape[1:])
    losses = per_example_loss(model, xs, y.repeat(2 * d)).view(2, d, n)
    fd = ((losses[0] - losses[1]) / (2 * h)).T.reshape_as(x)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_flow_gradient_matches_one_sided_differences_of_the_warp():
    """At v = 0 the warp's derivative is the forward difference: step the flow one-sidedly."""
    model, (x, y) = smooth_model(), batch()
    n, _, h_, w_ = x.shape
    _, grad = flow_gradient(model, x, y, unit="pixels")
    h = 1e-5
    fd = torch.zeros(n, 2, h_, w_, dtype=torch.float64)
    f0 = per_example_loss(model, x, y)
    for k in range(2 * h_ * w_):
        e = torch.zeros(n, 2 * h_ * w_, dtype=torch.float64)
        e[:, k] = 1.0
        e = e.view(n, 2, h_, w_)
        f1 = per_example_loss(model, warp(x, h * e), y)
        f2 = per_example_loss(model, warp(x, 2 * h * e), y)
        fd.view(n, -1)[:, k] = (-3 * f0 + 4 * f1 - f2) / (2 * h)  # second-order one-sided
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)


def test_flow_gradient_closed_form_equals_autograd_through_the_warp(trained_model, test_batch):
    x, y = test_batch[0][:16], test_batch[1][:16]
    _, through_warp = flow_gradient(trained_model, x, y, method="warp")
    _, closed = flow_gradient(trained_model, x, y, method="closed_form")
    _, grad_x = input_gradient(trained_model, x, y)
    torch.testing.assert_close(closed, flow_gradient_closed_form(x, grad_x))
    torch.testing.assert_close(through_warp, closed, rtol=1e-4, atol=1e-7)
    assert closed.abs().sum() > 0


def test_normalized_units_scale_the_gradient_by_half_the_size_minus_one():
    model, (x, y) = smooth_model(), batch()
    _, px = flow_gradient(model, x, y, unit="pixels")
    _, norm = flow_gradient(model, x, y, unit="normalized")
    torch.testing.assert_close(norm, px * (SIZE - 1) / 2)
    pen_px = fgr_penalty(model, x, y, unit="pixels").penalty
    pen_norm = fgr_penalty(model, x, y, unit="normalized").penalty
    torch.testing.assert_close(pen_norm, pen_px * ((SIZE - 1) / 2) ** 2)


def test_fgr_matches_the_paper_code_convention_with_torch_grid_sample():
    """Independent check with torch's grid_sample (align_corners=True) and the paper code's
    penalty on the gradient of the batch-MEAN loss: paper = ours / B^2.

    The paper's own sampler clamps the second tap to the edge, so the derivative pointing out of
    the far edge (x = W - 1, y = H - 1) is 0, as in :mod:`gradshield.warp`. Torch matches it
    elsewhere with padding_mode="zeros" (its far-edge derivative samples the zero padding; its
    "border" mode instead zeroes the derivative at x = 0), so the far edge is compared apart."""
    model, (x, y) = smooth_model(), batch(n=4)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(4, 2, 3)
    grid = F.affine_grid(theta, x.shape, align_corners=True)
    flow = torch.zeros_like(grid, requires_grad=True)
    z = F.grid_sample(x, grid + flow, align_corners=True, padding_mode="zeros")
    loss = F.cross_entropy(model(z), y)
    (gd,) = torch.autograd.grad(loss, flow)
    gd = gd.permute(0, 3, 1, 2)  # (N, 2, H, W), channel 0 = x
    _, ours = flow_gradient(model, x, y, unit="normalized")
    b = x.shape[0]
    torch.testing.assert_close(gd[:, 0, :, :-1] * b, ours[:, 0, :, :-1])
    torch.testing.assert_close(gd[:, 1, :-1, :] * b, ours[:, 1, :-1, :])
    assert (ours[:, 0, :, -1] == 0).all() and (ours[:, 1, -1, :] == 0).all()
    gd = gd.clone()
    gd[:, 0, :, -1] = 0
    gd[:, 1, -1, :] = 0
    paper_reg = gd.pow(2).sum(dim=(1, 2, 3)).mean()
    pen = fgr_penalty(model, x, y, unit="normalized").penalty
    torch.testing.assert_close(300.0 * paper_reg, paper_fgr_lambda(300.0, batch_size=b) * pen)


def _directional_check(penalty_fn, model, x, y, directions: int = 3, h: float = 1e-5):
    """<d penalty / d theta, u> (double backprop) against central differences along u."""
    params = list(model.parameters())
    value = penalty_fn(model, x, y)
    grads = torch.autograd.grad(value, params)
    gen = torch.Generator().manual_seed(7)
    for _ in range(directions):
        u = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        analytic = sum((g * d).sum() for g, d in zip(grads, u, strict=True))
        with torch.no_grad():
            for p, d in zip(params, u, strict=True):
                p.add_(h * d)
        plus = penalty_fn(model, x, y).detach()
        with torch.no_grad():
            for p, d in zip(params, u, strict=True):
                p.sub_(2 * h * d)
        minus = penalty_fn(model, x, y).detach()
        with torch.no_grad():
            for p, d in zip(params, u, strict=True):
                p.add_(h * d)
        numeric = (plus - minus) / (2 * h)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-10)
        assert analytic.abs() > 1e-6  # a non-trivial direction


@pytest.mark.parametrize("kind", ["igr", "fgr"])
def test_penalty_parameter_gradients_match_finite_differences(kind):
    model, (x, y) = smooth_model(), batch()

    def penalty(m, xx, yy):
        if kind == "igr":
            return igr_penalty(m, xx, yy).penalty
        return fgr_penalty(m, xx, yy, unit="pixels").penalty

    _directional_check(penalty, model, x, y)


def test_total_loss_gradient_matches_finite_differences():
    model, (x, y) = smooth_model(), batch()
    _directional_check(lambda m, xx, yy: fgr_penalty(m, xx, yy).total(0.5), model, x, y)


def test_penalty_values_match_their_definition_from_finite_difference_gradients():
    """The penalty is the batch mean of the per-example squared gradient norms."""
    model, (x, y) = smooth_model(), batch()
    _, gx = input_gradient(model, x, y)
    _, gv = flow_gradient(model, x, y, unit="pixels")
    torch.testing.assert_close(igr_penalty(model, x, y).penalty,
                               gx.pow(2).sum(dim=(1, 2, 3)).mean())
    torch.testing.assert_close(fgr_penalty(model, x, y, unit="pixels").penalty,
                               gv.pow(2).sum(dim=(1, 2, 3)).mean())
    torch.testing.assert_close(igr_penalty(model, x, y).loss, per_example_loss(model, x, y).mean())


@pytest.mark.parametrize("kind", ["igr", "fgr"])
def test_penalty_is_invariant_to_the_batch_size(kind, trained_model, test_batch):
    """Per-example averaging: the penalty of a batch is the mean of its halves' penalties."""
    fn = igr_penalty if kind == "igr" else fgr_penalty
    x, y = test_batch[0][:32], test_batch[1][:32]
    whole = fn(trained_model, x, y).penalty
    halves = (fn(trained_model, x[:16], y[:16]).penalty + fn(trained_model, x[16:], y[16:]).penalty) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-4, atol=0)
    assert whole > 0


def test_flow_random_start_units_reproducibility_and_range():
    x, _ = batch(n=2, size=9)
    x = x.float()
    a = flow_random_start(x, 0.01, torch.Generator().manual_seed(3))
    b = flow_random_start(x, 0.01 * (9 - 1) / 2, torch.Generator().manual_seed(3), unit="pixels")
    torch.testing.assert_close(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1 and not torch.equal(a, x)
    assert torch.equal(flow_random_start(x, 0.0), x)
    with pytest.raises(GradshieldError, match="sigma"):
        flow_random_start(x, -1.0)
    with pytest.raises(GradshieldError, match="unit"):
        fgr_penalty(smooth_model(), *batch(), unit="px")
