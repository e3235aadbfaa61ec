"""Optimisation attacks: C&W-L2 and stAdv."""

from __future__ import annotations

import math

import pytest
import torch

from gradshield.attacks import FGR_PAPER, cw_l2, flow_smoothness, margin, stadv
from gradshield.errors import GradshieldError
from gradshield.models import create_model
from gradshield.warp import warp
from tests.helpers import GroupMeans, LinearBinary, OneAtATime, spread, targeted_l2_optimum


def test_cw_finds_the_minimum_l2_perturbation_of_a_linear_model():
    """The smallest L2 change that flips sign(w.x + b) is (w.x + b) / ||w||_2 (box not binding)."""
    w = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    x = torch.full((3, 3, 6, 6), 0.5)
    scores = torch.tensor([0.5, 1.0, 2.0])
    model = LinearBinary(w, 0.0)
    model.b = scores - float(x[0].flatten() @ w.flatten())  # one margin per example
    y = torch.ones(3, dtype=torch.long)
    result = cw_l2(model, x, y, steps=200, binary_search_steps=12, lr=1e-2)
    optimum = scores / w.norm()
    assert result.success.all()
    assert (result.perturbation_size >= optimum * (1 - 1e-3)).all()
    assert (result.perturbation_size <= 1.05 * optimum).all(), (result.perturbation_size, optimum)


def test_cw_contract_on_real_model(trained_model, test_batch):
    x, y = spread(test_batch, 32)
    trained_model.train()
    result = cw_l2(trained_model, x, y, steps=10, binary_search_steps=2)
    assert trained_model.training
    trained_model.eval()
    with torch.no_grad():
        assert torch.equal(trained_model(result.adversarial).argmax(1) != y, result.success)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    torch.testing.assert_close(result.perturbation_size, (result.adversarial - x).flatten(1).norm(dim=1))
    attacked = result.perturbation_size > 0
    assert (result.queries[attacked] == 1 + 2 * 10).all()
    assert result.success_rate > 0.5
    # more search steps never give a larger distance (the best over rounds is kept)
    longer = cw_l2(trained_model, x, y, steps=10, binary_search_steps=4)
    both = result.success & longer.success
    assert (longer.perturbation_size[both] <= result.perturbation_size[both] + 1e-6).all()
    with pytest.raises(GradshieldError, match="steps"):
        cw_l2(trained_model, x, y, steps=0)
    with pytest.raises(GradshieldError, match="c must"):
        cw_l2(trained_model, x, y, c=-1.0)


def test_flow_smoothness_closed_form():
    flow = torch.zeros(2, 2, 4, 5, dtype=torch.float64)
    pairs = 4 * 4 + 3 * 5
    torch.testing.assert_close(flow_smoothness(flow, eps=1e-8),
                               torch.full((2,), 2 * pairs * math.sqrt(1e-8), dtype=torch.float64))
    flow[1, 0, :, 3:] = 1.0  # a vertical edge of height 1 between columns 2 and 3 (4 pairs)
    flow[1, 1, :, 3:] = 1.0
    expect = 2 * (4 * math.sqrt(2 + 1e-8) + (pairs - 4) * math.sqrt(1e-8))
    assert float(flow_smoothness(flow, eps=1e-8)[1]) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("settings", [{}, FGR_PAPER])
def test_stadv_contract_on_real_model(trained_model, test_batch, settings):
    x, y = spread(test_batch, 32)
    trained_model.train()
    result = stadv(trained_model, x, y, steps=20, **settings)
    assert trained_model.training
    trained_model.eval()
    with torch.no_grad():
        assert torch.equal(trained_model(result.adversarial).argmax(1) != y, result.success)
    torch.testing.assert_close(result.adversarial, warp(x, result.perturbation))
    torch.testing.assert_close(result.perturbation_size, result.perturbation.abs().flatten(1).amax(1))
    torch.testing.assert_close(result.info["smoothness"], flow_smoothness(result.perturbation))
    assert result.success_rate > 0.6


def test_stadv_smoothness_weight_trades_success_for_smoothness(trained_model, test_batch):
    x, y = spread(test_batch, 32)
    loose = stadv(trained_model, x, y, steps=20, tau=0.0)
    tight = stadv(trained_model, x, y, steps=20, tau=0.05)
    both = loose.success & tight.success & (loose.perturbation_size > 0)
    assert both.sum() >= 3
    assert tight.info["smoothness"][both].mean() < loose.info["smoothness"][both].mean()
    with pytest.raises(GradshieldError, match="optimizer"):
        stadv(trained_model, x, y, optimizer="lbfgs")


def test_targeted_cw_and_stadv_hit_the_target(trained_model, test_batch):
    x, y = spread(test_batch, 16)
    target = (y + 3) % 10
    for result in (cw_l2(trained_model, x, target, targeted=True, labels=y, steps=20, binary_search_steps=3),
                   stadv(trained_model, x, target, targeted=True, labels=y, steps=30)):
        with torch.no_grad():
            hit = trained_model(result.adversarial).argmax(1) == target
        assert torch.equal(hit, result.success) and result.success.any()


def test_targeted_cw_finds_the_smallest_l2_change_to_the_target():
    """GroupMeans (each logit the mean of its own pixels) has a closed-form minimum L2 change
    that makes the target win (images in [0.2, 0.8], so the box does not bind): C&W must reach
    every target, never below that minimum, and within 5 % of it."""
    gen = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(20, 3, 8, 8, generator=gen)
    model = GroupMeans()
    with torch.no_grad():
        y = model(x).argmax(1)
    target = (y + 1 + torch.randint(0, 9, (20,), generator=gen)) % 10
    optimum = targeted_l2_optimum(model, x, target)
    result = cw_l2(model, x, target, targeted=True, labels=y, steps=100, binary_search_steps=5)
    with torch.no_grad():
        assert torch.equal(model(result.adversarial).argmax(1) == target, result.success)
    assert result.success.all()
    assert (result.perturbation_size >= optimum * (1 - 1e-4)).all()
    assert (result.perturbation_size <= 1.05 * optimum).all(), result.perturbation_size / optimum


def test_targeted_stadv_reaches_the_target_and_never_below_the_smallest_flow():
    """The ramp problem's margin is linear in the flow (test_attacks_pgd.ramp_problem); with the
    bias set so that class 0 needs an L-inf flow of 0.1-0.5 px, targeted stAdv reaches class 0
    on every example, with a flow no smaller than that minimum."""
    from tests.test_attacks_pgd import ramp_problem

    model, x, y, gradient = ramp_problem(n=4)
    need = torch.tensor([0.1, 0.2, 0.3, 0.5])
    with torch.no_grad():
        score = model(x)[:, 1] - model.b
    model.b = need * float(gradient.abs().sum()) - score  # score(x) = need * ||g||_1
    target = torch.zeros(4, dtype=torch.long)
    result = stadv(model, x, target, targeted=True, labels=y, steps=100)
    with torch.no_grad():
        assert torch.equal(model(result.adversarial).argmax(1) == target, result.success)
    assert result.success.all()
    assert (result.perturbation_size >= need * (1 - 1e-4)).all(), result.perturbation_size


def test_cw_and_stadv_do_not_depend_on_the_batch(trained_model, test_batch):
    """The model runs one example at a time, so only the attack could mix examples."""
    x, y = spread(test_batch, 8)
    model = OneAtATime(trained_model)
    for attack in (lambda a, b: cw_l2(model, a, b, steps=5, binary_search_steps=2),
                   lambda a, b: stadv(model, a, b, steps=5)):
        full = attack(x, y)
        single = [attack(x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
        assert torch.equal(full.success, torch.cat([r.success for r in single]))
        singles = torch.cat([r.adversarial for r in single])
        torch.testing.assert_close(full.adversarial, singles, atol=1e-5, rtol=0)


def _tiny_model_and_batch():
    torch.manual_seed(0)
    model = create_model("compact", width=0.25).eval()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)  # every example correct at the start
    return model, x, y


def test_penalized_objective_puts_c_where_each_balance_says():
    from gradshield.attacks.stadv import flow_smoothness, penalized_objective

    model, x, y = _tiny_model_and_batch()
    flow = 0.1 * torch.randn(8, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    logits = model(x)
    gap = margin(logits, y)
    smooth = flow_smoothness(flow)
    loss = penalized_objective(logits, y, flow, c=10, tau=0.05, balance="loss", kappa=0, targeted=False)
    dist = penalized_objective(logits, y, flow, c=10, tau=0.05, balance="distance", kappa=0,
                               targeted=False)
    torch.testing.assert_close(loss, 10 * gap + 0.05 * smooth)
    torch.testing.assert_close(dist, gap + 10 * smooth)


@pytest.mark.parametrize("attack", ["stadv", "es"])
def test_c_on_the_distance_keeps_flows_at_zero_and_on_the_loss_fools(attack):
    """With an enormous c, c on the distance term makes any flow too costly (nothing is fooled);
    c on the adversarial loss makes the margin all that counts (examples are fooled)."""
    from gradshield.attacks import evolution_strategies_penalized

    model, x, y = _tiny_model_and_batch()

    def run(balance):
        if attack == "stadv":
            lr = 0.05 if balance == "loss" else 1e-9
            return stadv(model, x, y, c=1e6, balance=balance, steps=30, optimizer="sgd", lr=lr)
        return evolution_strategies_penalized(model, x, y, c=1e6, balance=balance, steps=15,
                                              samples=5, generator=torch.Generator().manual_seed(3))

    on_distance, on_loss = run("distance"), run("loss")
    assert not on_distance.success.any()
    assert on_distance.perturbation_size.max() < 1e-3
    assert on_loss.success.sum() >= 4
    assert (on_loss.perturbation_size[on_loss.success] > 0).all()


def test_penalized_evolution_strategies_takes_no_budget_and_only_flows():
    from gradshield.attacks import evolution_strategies

    model, x, y = _tiny_model_and_batch()
    with pytest.raises(GradshieldError, match="takes no eps"):
        evolution_strategies(model, x, y, eps=0.1, objective="penalized")
    with pytest.raises(GradshieldError, match="flow space"):
        evolution_strategies(model, x, y, space="additive", objective="penalized")
    with pytest.raises(GradshieldError, match="balance must be one of"):
        stadv(model, x, y, balance="middle")
