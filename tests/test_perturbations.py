"""Perturbation spaces: exact projections, steepest-ascent steps, sampling, flow gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from gradshield.attacks.base import attack_loss
from gradshield.attacks.pgd import _loss_and_grad
from gradshield.errors import GradshieldError
from gradshield.perturbations import (
    Additive,
    Flow,
    norm_of,
    project,
    project_l1,
    sample_ball,
    steepest_ascent,
)


def l1_projection_bisection(v: np.ndarray, eps: float) -> np.ndarray:
    """Independent float64 solver: the L1 projection is soft-thresholding at the theta >= 0 with
    sum(max(|v| - theta, 0)) = eps, found here by bisection (no sorting)."""
    if np.abs(v).sum() <= eps:
        return v.copy()
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(v) - mid, 0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(np.abs(v) - (lo + hi) / 2, 0)


vectors = arrays(np.float64, st.integers(1, 40),
                 elements=st.floats(-10, 10, allow_nan=False, allow_subnormal=False))


@settings(max_examples=200, deadline=None)
@given(v=vectors, eps=st.floats(0, 20, allow_subnormal=False))
def test_l1_projection_matches_independent_solver(v, eps):
    got = project(torch.from_numpy(v)[None], eps, "l1")[0].numpy()
    want = l1_projection_bisection(v, eps)
    assert np.abs(got).sum() <= eps + 1e-9 * max(1.0, eps)
    np.testing.assert_allclose(got, want, atol=1e-8 * max(1.0, np.abs(v).max()))


def test_l1_projection_of_sparse_rows_in_a_batch():
    """Rows with few nonzeros (as after single-coordinate L1 steps) take the top-k path; a batch
    mixing sparse, dense, all-zero and inside-the-ball rows matches the independent solver row by
    row, in float64 and in float32."""
    gen = torch.Generator().manual_seed(3)
    rows = torch.zeros(6, 3, 8, 8, dtype=torch.float64)
    for r, count in enumerate((1, 3, 10)):
        index = torch.randperm(192, generator=gen)[:count]
        rows[r].view(-1)[index] = torch.randn(count, generator=gen, dtype=torch.float64)
    rows[3] = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)  # dense
    rows[5].view(-1)[7] = 1e-3  # inside the ball
    eps = torch.tensor([0.5, 0.5, 1.0, 2.0, 0.5, 0.5], dtype=torch.float64)
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
        got = project(rows.to(dtype), eps.to(dtype), "l1").double()
        for r in range(6):
            want = l1_projection_bisection(rows[r].to(dtype).double().flatten().numpy(), float(eps[r]))
            np.testing.assert_allclose(got[r].flatten().numpy(), want, atol=tolerance)


@settings(max_examples=100, deadline=None)
@given(v=vectors, eps=st.floats(0, 20, allow_subnormal=False), norm=st.sampled_from(["linf", "l2", "l1"]))
def test_projection_is_nearest_point_of_ball(v, eps, norm):
    """Inside the ball, and no random point of the ball (nor of its boundary) is closer."""
    t = torch.from_numpy(v)[None]
    p = project(t, eps, norm)
    assert float(norm_of(p, norm)[0]) <= eps * (1 + 1e-12) + 1e-12
    g = torch.Generator().manual_seed(0)
    z = sample_ball((500, v.size), torch.full((500, 1), eps, dtype=torch.float64), norm, g, t)
    # also points on the sphere (rescaled samples), where the nearest point lies when v is outside
    sphere = z * (eps / norm_of(z, norm).clamp_min(1e-300))[:, None]
    candidates = torch.cat([z, sphere])
    dist_p = float((t - p).norm())
    assert (candidates - t).norm(dim=1).min() >= dist_p - 1e-9
    # variational inequality of a projection onto a convex set: <v - p, z - p> <= 0
    assert float(((t - p) * (candidates - p)).sum(1).max()) <= 1e-9 * max(1.0, float(t.abs().max()) ** 2)


def test_projection_float32_images_and_per_example_eps():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 3, 8, 8, generator=g)
    eps = torch.tensor([0.0, 0.5, 1.0, 5.0, 50.0, 1e4])
    for norm in ("linf", "l2", "l1"):
        p = project(delta, eps, norm)
        assert (norm_of(p, norm) <= eps * (1 + 1e-5) + 1e-6).all()
        inside = norm_of(delta, norm) <= eps
        assert torch.equal(p[inside], delta[inside])
    want = np.stack([l1_projection_bisection(d.double().numpy().ravel(), float(e))
                     for d, e in zip(delta, eps, strict=True)])
    got = project_l1(delta, eps.view(-1, 1, 1, 1)).reshape(6, -1).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_steepest_ascent_reaches_the_dual_norm():
    """For a linear objective <g, d>, the step of size s achieves s * ||g||_dual."""
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    s = torch.full((4, 1, 1, 1), 0.3, dtype=torch.float64)
    dual = {"linf": "l1", "l2": "l2", "l1": "linf"}
    for norm in ("linf", "l2", "l1"):
        step = steepest_ascent(grad, s, norm)
        torch.testing.assert_close(norm_of(step, norm), torch.full((4,), 0.3, dtype=torch.float64))
        torch.testing.assert_close((step * grad).flatten(1).sum(1), 0.3 * norm_of(grad, dual[norm]))
    top = steepest_ascent(grad, s, "l1", top_k=7)
    assert ((top != 0).flatten(1).sum(1) == 7).all()
    torch.testing.assert_close(norm_of(top, "l1"), torch.full((4,), 0.3, dtype=torch.float64))
    assert torch.equal(steepest_ascent(torch.zeros_like(grad), s, "l2"), torch.zeros_like(grad))


def test_l1_step_skips_saturated_coordinates():
    x = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    grad = torch.tensor([[[[5.0, 1.0, -4.0]]]])  # the two largest push out of [0, 1]
    step = Additive("l1", 1.0, l1_top_k=1).step(x, torch.zeros_like(x), grad, 0.2)
    torch.testing.assert_close(step, torch.tensor([[[[0.0, 0.2, 0.0]]]]))


def test_sampling_inside_ball_and_random_init_feasible():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, 3, 8, 8, generator=g)
    for norm, eps in (("linf", 0.1), ("l2", 1.0), ("l1", 5.0)):
        space = Additive(norm, eps)
        delta = space.init(x, random=True, generator=g)
        assert (space.size(delta) <= eps * (1 + 1e-5)).all()
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1 + 1e-6).all()
        assert space.size(delta).min() > 0
    flow = Flow("l2", 2.0).init(x, random=True, generator=g)
    assert flow.shape == (50, 2, 8, 8) and (norm_of(flow, "l2") <= 2.0 * (1 + 1e-5)).all()
    assert torch.equal(Flow("linf", 2.0).init(x), torch.zeros(50, 2, 8, 8))


def test_same_generator_seed_same_init():
    x = torch.rand(4, 3, 8, 8)
    a = Additive("l2", 1.0).init(x, random=True, generator=torch.Generator().manual_seed(5))
    b = Additive("l2", 1.0).init(x, random=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_attack_gradient_through_flow_matches_finite_differences(padding):
    """The gradient the flow attacks step along (loss -> model -> warp -> flow) vs float64 central
    differences, at a non-integer flow (away from the kinks of bilinear interpolation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 36, 5)).double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 3])
    space = Flow("linf", 1.0, padding=padding)
    flow = (torch.rand(2, 2, 6, 6, dtype=torch.float64) - 0.5) * 1.5
    flow = torch.where((flow - flow.round()).abs() < 0.05, flow + 0.1, flow)  # keep off integer offsets
    objective = lambda logits, rows: attack_loss(logits, y[rows])
    _, grad, _ = _loss_and_grad(model, space, x, flow, objective, slice(None))
    h = 1e-6
    numeric = torch.zeros_like(flow)
    with torch.no_grad():
        for idx in np.ndindex(*flow.shape[1:]):
            bump = torch.zeros_like(flow)
            bump[(slice(None), *idx)] = h
            up = attack_loss(model(space.apply(x, flow + bump)), y)
            down = attack_loss(model(space.apply(x, flow - bump)), y)
            numeric[(slice(None), *idx)] = (up - down) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


def test_attack_gradient_at_identity_is_forward_difference():
    """At zero flow the flow attacks use the one-sided forward difference (the warp's convention)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 25, 4)).double()
    x = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([2])
    space = Flow("linf", 1.0)
    objective = lambda logits, rows: attack_loss(logits, y[rows])
    _, grad, _ = _loss_and_grad(model, space, x, space.init(x), objective, slice(None))
    h = 1e-7
    numeric = torch.zeros_like(grad)
    with torch.no_grad():
        base = attack_loss(model(x), y)
        for idx in np.ndindex(*grad.shape[1:]):
            bump = torch.zeros_like(grad)
            bump[(slice(None), *idx)] = h
            numeric[(slice(None), *idx)] = (attack_loss(model(space.apply(x, bump)), y) - base) / h
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [
    lambda: Additive("l3", 1.0),
    lambda: Additive("linf", -0.1),
    lambda: Additive("linf", float("nan")),
    lambda: Additive("l2", torch.tensor([0.1, -1.0])),
    lambda: Additive("l1", 1.0, l1_top_k=0),
    lambda: Flow("l1", 1.0),
    lambda: Flow("linf", 1.0, padding="reflect"),
])
def test_spaces_reject_nonsense(bad):
    with pytest.raises(GradshieldError):
        bad()


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_norm_of_is_layout_independent_and_handles_flat_and_empty_rows(norm):
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(4, 3, 5, 6, generator=gen)
    expected = {"linf": delta.reshape(4, -1).abs().amax(1), "l2": delta.reshape(4, -1).norm(dim=1),
                "l1": delta.reshape(4, -1).abs().sum(1)}[norm]
    last = delta.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(norm_of(last, norm), expected)
    torch.testing.assert_close(norm_of(delta[:, 0, 0, :2].reshape(4, 2), norm),
                               {"linf": delta[:, 0, 0, :2].abs().amax(1),
                                "l2": delta[:, 0, 0, :2].norm(dim=1),
                                "l1": delta[:, 0, 0, :2].abs().sum(1)}[norm])
    torch.testing.assert_close(norm_of(delta[:, 0, 0, 0], norm), delta[:, 0, 0, 0].abs())
    assert norm_of(torch.zeros(4, 0), norm).tolist() == [0.0] * 4
    assert norm_of(torch.zeros(0, 3, 5, 6), norm).shape == (0,)  # an empty batch
    with pytest.raises(GradshieldError, match="unknown norm"):
        norm_of(delta, "l3")
