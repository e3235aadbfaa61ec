"""The projected-gradient engine: FGSM / PGD / flow attacks, their contracts and closed-form optima."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradshield.attacks import fgsm, flow_pgd, flow_single_step, pgd
from gradshield.errors import GradshieldError
from gradshield.perturbations import norm_of
from tests.helpers import LinearBinary, OneAtATime, spread, targeted_problem


class FixedLinear(nn.Module):
    """A classifier with no parameters at all (weights are a plain tensor attribute)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.weight = torch.randn(classes, features, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return torch.sin(3 * x).flatten(1) @ self.weight.T




def linear_setup(b: float = 15.0):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, 8, 8, generator=g)
    x = torch.full((2, 3, 8, 8), 0.5)
    return LinearBinary(w, b), w, x, torch.ones(2, dtype=torch.long)


@pytest.mark.parametrize("norm,eps,dual", [("linf", 0.05, "l1"), ("l2", 0.3, "l2"), ("l1", 0.4, "linf")])
def test_pgd_reaches_the_closed_form_optimum_on_a_linear_model(norm, eps, dual):
    """Margin drop w.(x - x') of the optimal perturbation is eps * ||w||_dual (box not binding)."""
    model, w, x, y = linear_setup()
    for loss in ("ce", "margin"):
        result = pgd(model, x, y, eps=eps, norm=norm, steps=10, loss=loss, l1_top_k=1)
        drop = (model(x) - model(result.adversarial))[:, 1].detach()
        optimum = eps * float(norm_of(w, dual)[0])
        assert not result.success.any()  # b is large: no success, so the final iterate is returned
        assert (drop >= 0.95 * optimum).all() and (drop <= optimum * (1 + 1e-4)).all(), (drop, optimum)
    if norm == "linf":
        single = fgsm(model, x, y, eps=eps)
        torch.testing.assert_close(single.perturbation, -eps * w.sign().expand_as(x))


def test_contract_on_real_model(trained_model, test_batch):
    x, y = spread(test_batch, 64)
    trained_model.train()
    clean_wrong = trained_model.eval()(x).argmax(1) != y
    trained_model.train()
    for attack, kwargs, norm in [
        (pgd, {"eps": 4 / 255, "norm": "linf", "steps": 5}, "linf"),
        (pgd, {"eps": 0.25, "norm": "l2", "steps": 5}, "l2"),
        (pgd, {"eps": 4.0, "norm": "l1", "steps": 5}, "l1"),
        (pgd, {"eps": torch.linspace(0, 8 / 255, 64), "steps": 3, "random_start": True,
               "restarts": 2, "generator": torch.Generator().manual_seed(0)}, "linf"),
        (flow_pgd, {"eps": 0.3, "steps": 5}, "linf"),
        (flow_pgd, {"eps": 3.0, "norm": "l2", "steps": 5}, "l2"),
        (flow_single_step, {"eps": 0.5}, "linf"),
        (fgsm, {"eps": 2 / 255}, "linf"),
    ]:
        result = attack(trained_model, x, y, **kwargs)
        eps = kwargs["eps"]
        assert trained_model.training and all(m.training for m in trained_model.modules())
        assert result.adversarial.shape == x.shape
        assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
        size = norm_of(result.perturbation, norm)
        torch.testing.assert_close(size, result.perturbation_size)
        assert (size <= eps * (1 + 1e-5) + 1e-6).all()
        trained_model.eval()
        with torch.no_grad():
            fooled = trained_model(result.adversarial).argmax(1) != y
        trained_model.train()
        assert torch.equal(fooled, result.success)
        assert result.success[clean_wrong].all() and (result.queries[clean_wrong] == 1).all()
        assert (result.perturbation_size[clean_wrong] == 0).all()
        assert (result.queries >= 1).all()
        assert result.queries.max() <= 1 + kwargs.get("restarts", 1) * (kwargs.get("steps", 1) + 1)


def test_success_grows_with_budget_and_steps(trained_model, test_batch):
    x, y = spread(test_batch, 128)
    rates = [pgd(trained_model, x, y, eps=e, steps=5).success_rate for e in (0, 1 / 255, 4 / 255)]
    assert rates[0] < rates[1] < rates[2]
    assert pgd(trained_model, x, y, eps=0.0).success_rate == pytest.approx(rates[0])
    assert flow_pgd(trained_model, x, y, eps=0.5, steps=10).success_rate > \
        flow_single_step(trained_model, x, y, eps=0.5).success_rate > rates[0]


@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("l2", 0.2), ("l1", 3.0), ("flow", 0.3)])
def test_batch_size_does_not_change_the_result(trained_model, test_batch, norm, eps):
    """No example influences another: one batch of 24 and 24 batches of one give the same result.
    The model runs one example at a time, so its own arithmetic is the same either way (a
    convolution library picks kernels per batch shape) and any difference is the attack's."""
    x, y = spread(test_batch, 24)
    model = OneAtATime(trained_model)
    attack = (lambda m, a, b: flow_pgd(m, a, b, eps=eps, steps=4)) if norm == "flow" else \
        (lambda m, a, b: pgd(m, a, b, eps=eps, norm=norm, steps=4))
    full = attack(model, x, y)
    singles = [attack(model, x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    single_adv = torch.cat([r.adversarial for r in singles])
    assert torch.equal(full.success, torch.cat([r.success for r in singles]))
    torch.testing.assert_close(full.adversarial, single_adv, atol=1e-6, rtol=0)


def test_targeted_attack_hits_the_target(trained_model, test_batch):
    x, y = spread(test_batch, 64)
    target = (y + 1) % 10
    result = pgd(trained_model, x, target, eps=8 / 255, steps=10, targeted=True, labels=y)
    with torch.no_grad():
        hit = trained_model(result.adversarial).argmax(1) == target
    assert torch.equal(hit, result.success) and result.success.any()
    with pytest.raises(GradshieldError, match="target"):
        pgd(trained_model, x, y, eps=0.01, targeted=True, labels=y)


def test_targeted_pgd_reaches_exactly_the_reachable_targets():
    """Each logit of GroupMeans is the mean of its own pixels, so the best targeted L-inf attack
    is known: raise the target's pixels by eps, lower all others. Targeted PGD must hit every
    target that this reaches and no other (examples whose best margin is ~0 are left out)."""
    eps = 0.05
    model, x, y, target, margin = targeted_problem(eps=eps)
    decided = margin.abs() > 1e-3
    assert decided.float().mean() > 0.95 and 0.2 < (margin > 0).float().mean() < 0.8
    result = pgd(model, x, target, eps=eps, steps=10, targeted=True, labels=y)
    with torch.no_grad():
        assert torch.equal(model(result.adversarial).argmax(1) == target, result.success)
    assert torch.equal(result.success[decided], (margin > 0)[decided])


def test_models_without_parameters():
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = FixedLinear(3 * 64, 4)
    assert not list(model.parameters())
    y = model(x).argmax(1)
    for attack in (lambda: pgd(model, x, y, eps=0.1), lambda: flow_pgd(model, x, y, eps=1.0)):
        result = attack()
        assert result.success.any()
    # logits = the 3 channel values of a 1x1 image: fooled iff the top-2 gap is below 2 * eps
    pixels = torch.rand(256, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    labels = pixels.flatten(1).argmax(1)
    top2 = pixels.flatten(1).topk(2, dim=1).values
    result = pgd(nn.Flatten(), pixels, labels, eps=0.1, steps=10, loss="margin")
    decided = ((top2[:, 0] - top2[:, 1]) - 0.2).abs() > 1e-4
    assert torch.equal(result.success[decided], (top2[:, 0] - top2[:, 1] < 0.2)[decided])
    # a bare GCM layer in front (no parameters either): attacked through BPDA it is the same problem
    from gradshield.attacks import bpda
    from gradshield.defenses.concealment import GradientConcealment

    concealed = nn.Sequential(GradientConcealment(), nn.Flatten())
    assert not list(concealed.parameters())
    through = pgd(bpda(concealed, lambda m: isinstance(m, GradientConcealment)), pixels, labels,
                  eps=0.1, steps=10, loss="margin")
    assert torch.equal(through.success[decided], result.success[decided])


def test_nonsense_is_rejected(trained_model, test_batch):
    x, y = spread(test_batch, 4)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        (lambda: pgd(trained_model, x, y, eps=-0.1), "eps"),
        (lambda: pgd(trained_model, x, y, eps=0.1, steps=0), "steps"),
        (lambda: pgd(trained_model, x, y, eps=0.1, norm="l3"), "norm"),
        (lambda: pgd(trained_model, nan, y, eps=0.1), "NaN"),
        (lambda: pgd(trained_model, x, y, eps=0.1, restarts=3), "random_start"),
        (lambda: pgd(trained_model, x, y, eps=0.1, step_size=0.1, rel_step_size=0.1), "step_size"),
        (lambda: pgd(trained_model, x, y, eps=0.1, loss="hinge"), "loss"),
        (lambda: pgd(trained_model, x * 255, y, eps=0.1), r"\[0, 1\]"),
        (lambda: pgd(trained_model, x, y[:3], eps=0.1), "shape"),
        (lambda: pgd(trained_model, x, y, eps=torch.tensor([0.1, 0.1])), "entries"),
        (lambda: flow_pgd(trained_model, x, y, eps=-1.0), "eps"),
        (lambda: flow_pgd(trained_model, x, y, eps=1.0, norm="l1"), "norm"),
    ]
    for call, match in cases:
        with pytest.raises(GradshieldError, match=match):
            call()


def ramp_problem(n: int = 2, size: int = 8):
    """A linear ramp image and a linear binary model without border weights. Bilinear warping of
    a ramp is exact: warp(x, v) = x + a*v_x + b*v_y away from the border, so the margin is linear
    in the flow with gradient g = (a*W_p, b*W_p) per pixel (W_p = the score's weights summed over
    channels). Returns (model, x, y, g); the optimal drop in a ball of radius eps is
    eps * ||g||_dual."""
    a, b = 0.3 / size, 0.2 / size
    rows = torch.arange(size, dtype=torch.float32).view(size, 1)
    cols = torch.arange(size, dtype=torch.float32).view(1, size)
    x = (0.2 + a * cols + b * rows).expand(n, 3, size, size).contiguous()
    weights = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    weights[..., 0, :] = weights[..., -1, :] = weights[..., :, 0] = weights[..., :, -1] = 0
    channel_sum = weights.sum(1)  # (1, H, W)
    gradient = torch.stack([a * channel_sum, b * channel_sum], 1)
    return LinearBinary(weights, 15.0), x, torch.ones(n, dtype=torch.long), gradient


def assert_near_optimum(model, x, result, optimum, fraction=0.95):
    drop = (model(x) - model(result.adversarial))[:, 1].detach()
    assert not result.success.any()
    assert (drop >= fraction * optimum).all() and (drop <= optimum * (1 + 1e-4)).all(), (drop, optimum)


@pytest.mark.parametrize("norm,dual", [("linf", "l1"), ("l2", "l2")])
def test_flow_pgd_reaches_the_closed_form_optimum_on_a_ramp(norm, dual):
    model, x, y, gradient = ramp_problem()
    eps = 0.4 if norm == "linf" else 1.5
    result = flow_pgd(model, x, y, eps=eps, norm=norm, steps=10, loss="margin")
    assert_near_optimum(model, x, result, eps * float(norm_of(gradient, dual)[0]))


@pytest.mark.parametrize("norm,dual", [("linf", "l1"), ("l2", "l2")])
def test_flow_single_step_is_optimal_on_a_ramp(norm, dual):
    """One steepest step of size eps is THE optimum of a linear objective (both norms)."""
    model, x, y, gradient = ramp_problem()
    eps = 0.4 if norm == "linf" else 1.5
    result = flow_single_step(model, x, y, eps=eps, norm=norm, loss="margin")
    assert_near_optimum(model, x, result, eps * float(norm_of(gradient, dual)[0]), fraction=0.9999)


def test_clean_pass_doubles_as_the_first_step_and_the_callers_tensors_are_untouched(trained_model,
                                                                                     test_batch):
    """Without a random start the clean evaluation is the first step's forward pass: an example
    never fooled costs steps + 1 evaluations (with a random start, 1 clean + steps + 1 final).
    The attack feeds the model channels-last images internally; the caller's images are left as
    they were and the adversarials come back in the ordinary contiguous layout."""
    x, _ = spread(test_batch, 16)
    with torch.no_grad():
        labels = trained_model(x).argmax(1)
    before = x.clone()
    plain = pgd(trained_model, x, labels, eps=1e-4, steps=5)
    started = pgd(trained_model, x, labels, eps=1e-4, steps=5, random_start=True,
                  generator=torch.Generator().manual_seed(0))
    for result, expected in ((plain, 5 + 1), (started, 1 + 5 + 1)):
        kept = ~result.success
        assert kept.sum() >= 12  # a 1e-4 budget fools (almost) nothing
        assert (result.queries[kept] == expected).all()
        assert result.adversarial.is_contiguous()
    assert torch.equal(x, before) and x.is_contiguous()
