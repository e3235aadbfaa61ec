"""IGR and FGR penalties: values and parameter gradients against float64 finite differences,
the flow gradient against its closed form and torch's grid_sample, units and batch invariance."""

from __future__ import annotations

import copy

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
from tests.helpers import OneAtATime

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
    """Per-example averaging: the penalty of a batch is the mean of its halves' penalties (the
    model runs one example at a time, so its arithmetic does not depend on the batch)."""
    fn = igr_penalty if kind == "igr" else fgr_penalty
    x, y = test_batch[0][:32], test_batch[1][:32]
    model = OneAtATime(trained_model)
    whole = fn(model, x, y).penalty
    halves = (fn(model, x[:16], y[:16]).penalty + fn(model, x[16:], y[16:]).penalty) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-6, atol=0)
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
    last = x.contiguous(memory_format=torch.channels_last)  # the training loop's layout
    warped = flow_random_start(last, 0.01, torch.Generator().manual_seed(3))
    assert warped.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(warped, a, rtol=0, atol=0)


def _bn_model(seed: int = 0) -> nn.Module:
    """A float64 CNN with train-mode BatchNorm (examples coupled through batch statistics)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(), nn.Linear(6 * SIZE * SIZE, 5)).double().train()


def _penalty_parameter_gradient(fn, model, x, y, **options):
    penalized = fn(model, x, y, **options)
    grads = torch.autograd.grad(penalized.penalty, list(model.parameters()))
    return penalized.penalty.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("kind,options", [("igr", {}), ("fgr", {"unit": "pixels"}),
                                          ("fgr", {"unit": "normalized"})])
def test_finite_difference_method_converges_to_the_exact_gradient(kind, options):
    """float64, train-mode BatchNorm: the value is exact and the parameter gradient's error
    shrinks linearly with fd_step (a one-sided difference: measured ~1.2 x fd_step here), down
    to below 1e-5 relative at fd_step = 1e-6."""
    fn = igr_penalty if kind == "igr" else fgr_penalty
    model, (x, y) = _bn_model(), batch(n=6)
    value, exact = _penalty_parameter_gradient(fn, model, x, y, **options)
    errors = []
    for step in (1e-2, 1e-4, 1e-6):
        fd_value, approx = _penalty_parameter_gradient(fn, model, x, y, method="finite_difference",
                                                       fd_step=step, **options)
        torch.testing.assert_close(fd_value, value, rtol=1e-12, atol=0)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[2] < 1e-5
    assert 50 < errors[0] / errors[1] < 200 and 50 < errors[1] / errors[2] < 200  # first order


def test_finite_difference_pass_leaves_batchnorm_statistics_as_the_exact_method_does():
    model_exact, (x, y) = _bn_model(), batch(n=6)
    model_fd = _bn_model()
    igr_penalty(model_exact, x, y)
    igr_penalty(model_fd, x, y, method="finite_difference")
    for a, b in zip(model_exact.buffers(), model_fd.buffers(), strict=True):
        assert torch.equal(a, b)
    assert all(m.momentum == 0.1 for m in model_fd.modules() if isinstance(m, nn.BatchNorm2d))


def _with_average_pooling(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every max-pooling layer replaced by average pooling."""
    module = copy.deepcopy(module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
    return module


def _with_tied_pooling_windows(model: nn.Module, x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """``x`` with a ``size`` x ``size`` square of the model's normalisation mean at (8, 8): it
    normalises to exact zeros, so the stem's outputs there are exact zeros (whatever the weights and
    the summation order) and every 2 x 2 window of the first max pooling inside the square holds
    four equal values, positioned differently relative to the image around the square."""
    x = x.clone()
    x[:, :, 8:8 + size, 8:8 + size] = model.normalize.mean.to(x.dtype).view(1, -1, 1, 1)
    return x


def _exact_ties_in_first_max_pool(model: nn.Module, x: torch.Tensor) -> int:
    pool = next(m for m in model.modules() if isinstance(m, nn.MaxPool2d))
    seen = []
    handle = pool.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    windows = F.unfold(seen[0].flatten(0, 1)[:, None], 2, stride=2)  # (N*C, 4, windows)
    return int(((windows == windows.amax(1, keepdim=True)).sum(1) > 1).sum())


@pytest.mark.parametrize("fn", [igr_penalty, fgr_penalty])
def test_finite_difference_on_real_images_exact_for_smooth_pooling_not_for_max_pooling(
        fn, trained_model, test_batch):
    """The trained compact net in train mode on 32 real images, float64, each with a flat square
    that puts exact ties in max-pooling windows (8-bit images can have such flat regions; here
    they are made on purpose, so the test does not depend on one model's activations). With the
    max pooling swapped for average pooling the input gradient is smooth and the finite difference
    converges to double backpropagation (error ~ step). With max pooling, where the step breaks a
    tie the parameter gradient changes route (double backpropagation takes the first maximum):
    the finite difference converges to a one-sided derivative, or diverges where the gradient
    jumps, not to the exact penalty gradient (why it is an option and not the default). Its
    error stays orders of magnitude above the smooth case's as the step shrinks."""
    x, y = test_batch[0][:32].double(), test_batch[1][:32]
    x = _with_tied_pooling_windows(trained_model, x)
    steps = (1e-5, 1e-6)

    def relative_errors(model):
        _, exact = _penalty_parameter_gradient(fn, model, x, y)
        errors = []
        for step in steps:
            _, approx = _penalty_parameter_gradient(fn, model, x, y, method="finite_difference",
                                                    fd_step=step)
            errors.append(float((approx - exact).norm() / exact.norm()))
        return errors

    smooth = relative_errors(_with_average_pooling(trained_model).double().train())
    assert smooth[1] < 1e-3 and smooth[1] < smooth[0] / 5, smooth  # converges, first order
    max_pooled = trained_model.double().train()
    assert _exact_ties_in_first_max_pool(max_pooled, x) >= len(x) * 32 * 6 * 6  # 6 x 6 windows x 32 channels
    tied = relative_errors(max_pooled)
    assert all(t > 1000 * s for t, s in zip(tied, smooth, strict=True)), (tied, smooth)


def test_finite_difference_options_are_checked():
    model, (x, y) = smooth_model(), batch()
    with pytest.raises(GradshieldError, match="method"):
        igr_penalty(model, x, y, method="fd")
    with pytest.raises(GradshieldError, match="fd_step"):
        fgr_penalty(model, x, y, method="finite_difference", fd_step=0.0)
