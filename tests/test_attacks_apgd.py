"""APGD and FAB: their rules as specified, step for step against the authors' code (pyautoattack)
on small float64 models, robust accuracy against it on real CIFAR-10 models (a vanilla and an
adversarially trained one), and APGD's strength against PGD of equal cost.

Run with ``pytest -s`` to see the measured numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradshield.attacks import apgd, attack_loss, dlr, fab
from gradshield.attacks.apgd import APGDStep
from gradshield.attacks.fab import project_to_hyperplane
from gradshield.errors import GradshieldError
from gradshield.perturbations import Additive, norm_of, project_l1_box
from tests.test_attacks_pgd import linear_setup

autoattack = pytest.importorskip("pyautoattack")
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted, L1_projection  # noqa: E402
from pyautoattack.fab_projections import projection_l2, projection_linf  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402

REF_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small classifier of 3x6x6 images into 10 classes (no convolutions: the memory layout
    cannot change its rounding)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype).eval()


def images(n: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- pieces


def test_dlr_loss_is_the_papers_and_invariant_to_logit_shift_and_scale():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    target = (y + 1 + torch.randint(0, 9, (64,), generator=torch.Generator().manual_seed(2))) % 10
    reference = APGDAttack_targeted(lambda z: z, eps=0.1)
    torch.testing.assert_close(dlr(logits, y), reference.dlr_loss(logits, y))
    reference.y_target = target
    torch.testing.assert_close(dlr(logits, target, y), reference.dlr_loss_targeted(logits, y))
    torch.testing.assert_close(attack_loss(logits, y, loss="dlr"), dlr(logits, y))
    torch.testing.assert_close(attack_loss(logits, target, targeted=True, loss="dlr", labels=y),
                               dlr(logits, target, y))
    for transformed in (3.0 * logits + 7.0, logits - 100.0):
        torch.testing.assert_close(dlr(transformed, y), dlr(logits, y))
        torch.testing.assert_close(dlr(transformed, target, y), dlr(logits, target, y))
    with pytest.raises(GradshieldError, match="labels="):
        attack_loss(logits, target, targeted=True, loss="dlr")
    with pytest.raises(GradshieldError, match="at least 3 classes"):
        dlr(logits[:, :2], y.clamp(max=1))


def test_l1_box_projection_is_exact_and_agrees_with_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 6, 6, generator=g, dtype=torch.float64)
    x[:, 0] = (x[:, 0] > 0.5).double()  # saturated pixels: the box binds
    v = torch.randn(32, 3, 6, 6, generator=g, dtype=torch.float64) * 0.4
    eps = torch.rand(32, generator=g, dtype=torch.float64) * 6
    ours = project_l1_box(v, x, eps)
    assert (norm_of(ours, "l1") <= eps * (1 + 1e-12)).all()
    assert ((x + ours) >= 0).all() and ((x + ours) <= 1).all()
    theirs = v + L1_projection(x.float(), v.float(), eps.float()).double()  # the reference: float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # optimality (KKT): a common threshold lam >= 0 with |d| = clip(|v| - lam, 0, room)
    room = torch.where(v > 0, 1 - x, x)
    inner = (ours.abs() > 1e-9) & (ours.abs() < room - 1e-9)
    lam = (v.abs() - ours.abs())[inner]
    rows = inner.nonzero()[:, 0]
    for i in rows.unique():
        spread = lam[rows == i]
        assert spread.max() - spread.min() < 1e-9
    inside = project_l1_box(v * 1e-3, x.clamp(0.1, 0.9), torch.full((32,), 10.0, dtype=torch.float64))
    torch.testing.assert_close(inside, v * 1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_agrees_with_the_reference(norm):
    g = torch.Generator().manual_seed(0)
    point = torch.rand(64, 300, generator=g, dtype=torch.float64)
    point[:, :50] = (point[:, :50] > 0.5).double()
    w = torch.randn(64, 300, generator=g, dtype=torch.float64)
    w[:, 100:120] = 0
    reachable = (w * point).sum(1) + torch.randn(64, generator=g, dtype=torch.float64) * 3
    for b in (reachable, reachable * 100):  # the second mostly beyond the box
        ours = project_to_hyperplane(point, w, b, norm)
        theirs = (projection_linf if norm == "linf" else projection_l2)(point.float(), w.float(), b.float())
        torch.testing.assert_close(ours, theirs.double(), atol=1e-5, rtol=0)
        assert ((point + ours) >= 0).all() and ((point + ours) <= 1).all()
    ours = project_to_hyperplane(point, w, reachable, norm)
    torch.testing.assert_close((w * (point + ours)).sum(1), reachable)


class _Space:
    """A stand-in space for driving the step rule by hand: steps are recorded, never projected."""

    norm = "linf"
    eps = 1.0

    def __init__(self):
        self.sizes = []

    def select(self, mask):
        return self

    def step(self, x, delta, grad, step_size):
        self.sizes.append(float(step_size[0]))
        return delta + step_size.view(-1, 1) * grad.sign()

    def project_feasible(self, x, delta):
        return delta


@pytest.mark.parametrize("trend,halvings", [("flat", 8), ("rising", 0)])
def test_apgd_step_size_schedule(trend, halvings):
    """100 iterations: checkpoints after 22, 41, 57, 70, 80, 87, 93 and 99 iterations (22 %, then
    intervals shrinking by 3 % to at least 6 %). A loss that never rises halves the step at each;
    a loss that always rises never does."""
    space, x = _Space(), torch.zeros(1, 1)
    stepper = APGDStep().begin(space, x, torch.zeros(1, 1), 100, torch.arange(1))
    delta = torch.zeros(1, 1)
    for t in range(100):
        value = torch.tensor([float(t) if trend == "rising" else 0.0])
        delta = stepper.step(t, x, delta, value, torch.ones(1, 1))
    sizes = torch.tensor(space.sizes)
    assert sizes[0] == 2.0 and sizes[-1] == 2.0 / 2**halvings
    if halvings:
        changes = (sizes[1:] != sizes[:-1]).nonzero().flatten() + 1
        assert changes.tolist() == [22, 41, 57, 70, 80, 87, 93, 99]


def _reference_single_run(model, x, y, norm, eps, steps, start, loss="ce"):
    reference = APGDAttack(model, n_iter=steps, norm=REF_NORM[norm], eps=eps, loss=loss, device="cpu")
    reference.init_hyperparam(x)
    return reference.attack_single_run(x, y, x_init=x + start)


@pytest.mark.parametrize("norm,eps,rtol", [("linf", 0.03, 1e-9), ("l2", 0.3, 1e-3)])
def test_apgd_run_equals_the_reference_from_the_same_start(norm, eps, rtol):
    """One APGD-CE run, from the same random start, on a float64 model: the same examples are
    fooled and the others end at the same highest loss as the authors' code (L2: within 1e-3;
    its normalisations add 1e-12 where ours divide exactly, and the projected momentum steps
    amplify that difference to ~1e-4 over 40 iterations)."""
    model, x = mlp(), images(64)
    y = model(x).argmax(1)
    steps = 40
    start = APGDStep().init(Additive(norm, eps), x, torch.Generator().manual_seed(0))
    ours = apgd(model, x, y, eps=eps, norm=norm, steps=steps, generator=torch.Generator().manual_seed(0))
    _, still_correct, best_loss, _ = _reference_single_run(model, x, y, norm, eps, steps, start)
    assert torch.equal(ours.success, ~still_correct)
    assert 0.2 < ours.success_rate < 0.8
    kept = ~ours.success
    with torch.no_grad():
        ours_loss = attack_loss(model(ours.adversarial), y)
    torch.testing.assert_close(ours_loss[kept], best_loss[kept], rtol=rtol, atol=1e-12)
    assert (norm_of(ours.perturbation, norm) <= eps * (1 + 1e-9)).all()


def test_apgd_l1_run_equals_the_reference():
    """APGD-L1 (sparse step, L1-box projection, its own schedule) from the same Gaussian start,
    in float32 (the reference's L1 projection computes in float32)."""
    model, x = mlp(dtype=torch.float32), images(64, dtype=torch.float32)
    y = model(x).argmax(1)
    eps, steps = 1.0, 40
    ours = apgd(model, x, y, eps=eps, norm="l1", steps=steps, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the reference draws its start from the global generator
    reference = APGDAttack(model, n_iter=steps, norm="L1", eps=eps, device="cpu")
    reference.init_hyperparam(x)
    _, still_correct, best_loss, _ = reference.attack_single_run(x, y)
    print(f"\nAPGD-L1 eps={eps} {steps} steps: success ours {ours.success_rate:.2%}, "
          f"reference {(~still_correct).float().mean():.2%}")
    assert 0.2 < ours.success_rate < 0.8
    assert torch.equal(ours.success, ~still_correct)
    # float32 rounding (a matrix product rounds differently with the batch size, in both codes)
    # changes which coordinates the sparse step picks on a few examples: their paths then differ
    # slightly; the step-for-step agreement is exact on each example's first steps
    kept = ~ours.success
    with torch.no_grad():
        ours_loss = attack_loss(model(ours.adversarial), y)
    torch.testing.assert_close(ours_loss[kept], best_loss[kept], rtol=2e-2, atol=0)
    assert (ours_loss[kept] - best_loss[kept]).abs().median() < 1e-5


@pytest.mark.parametrize("norm,eps,dual", [("linf", 0.05, "l1"), ("l2", 0.3, "l2")])
def test_apgd_reaches_the_closed_form_optimum_on_a_linear_model(norm, eps, dual):
    """(Not L1: APGD-L1's sparse step spreads the budget over its top-k coordinates, so on a
    linear model it stops short of the 1-sparse optimum, as the reference does.)"""
    model, w, x, y = linear_setup()
    model = model.double()
    x, w = x.double(), w.double()
    result = apgd(model, x, y, eps=eps, norm=norm, steps=20, generator=torch.Generator().manual_seed(0))
    drop = (model(x) - model(result.adversarial))[:, 1].detach()
    optimum = eps * float(norm_of(w, dual)[0])
    assert not result.success.any()  # the bias is large: APGD returns its highest-loss point
    assert (drop >= 0.95 * optimum).all() and (drop <= optimum * (1 + 1e-6)).all(), (drop, optimum)


def test_apgd_errors():
    model, x = mlp(), images(4)
    y = model(x).argmax(1)
    for call, match in [
        (lambda: apgd(model, x, y, eps=0.1, loss="hinge"), "loss"),
        (lambda: apgd(model, x, y, eps=0.1, n_target_classes=10), "n_target_classes"),
        (lambda: apgd(model, x, (y + 1) % 10, eps=0.1, n_target_classes=3, targeted=True, labels=y),
         "n_target_classes"),
        (lambda: apgd(model, x, (y + 1) % 10, eps=0.1, loss="dlr", targeted=True), "labels="),
        (lambda: apgd(model, x, y, eps=0.1, momentum=0.0), "momentum"),
        (lambda: apgd(model, x, y, eps=0.1, restarts=2, random_start=False), "random_start"),
        (lambda: fab(model, x, y, targeted=True), "untargeted"),
        (lambda: fab(model, x, y, restarts=2), "start_radius"),
        (lambda: fab(model, x, y, norm="l1"), "norm"),
    ]:
        with pytest.raises(GradshieldError, match=match):
            call()


def test_fab_agrees_with_the_reference_on_a_small_model():
    """FAB-T (3 target classes, 30 iterations): the same minimal L-inf sizes as the authors' code
    (deterministic: no random start)."""
    model, x = mlp(dtype=torch.float32), images(32, dtype=torch.float32)  # the reference runs float32
    y = model(x).argmax(1)
    ours = fab(model, x, y, norm="linf", steps=30, n_target_classes=3)
    reference = FABAttack_PT(model, norm="Linf", n_iter=30, eps=1.0, targeted=True, n_target_classes=3,
                             device="cpu")
    adv = reference.perturb(x, y)
    theirs = norm_of(adv - x, "linf")
    assert ours.success.all()
    with torch.no_grad():
        assert (model(ours.adversarial).argmax(1) != y).all()
    # the reference keeps, per example, the first target class that fools it within eps; ours the
    # smallest over all target classes
    assert (ours.perturbation_size <= theirs + 1e-6).all()
    first = fab(model, x, y, norm="linf", steps=30, n_target_classes=1)
    single = FABAttack_PT(model, norm="Linf", n_iter=30, eps=1.0, targeted=True, n_target_classes=1,
                          device="cpu").perturb(x, y)
    torch.testing.assert_close(first.perturbation_size, norm_of(single - x, "linf"), atol=1e-6, rtol=1e-6)


def _robust(model, adversarial, y, correct):
    with torch.no_grad():
        return correct & (model(adversarial).argmax(1) == y)


def spread(batch, n):
    images_, labels = batch
    index = torch.arange(n) * (len(labels) // n)
    return images_[index], labels[index]


def _mcnemar_bound(only_a: int, only_b: int) -> float:
    """A generous bound on the paired difference explained by noise: 3 standard deviations of
    the discordant count (McNemar), plus one example."""
    return 3 * math.sqrt(only_a + only_b) + 1
