"""Gradient-free attacks: Square and evolution strategies."""

from __future__ import annotations

import pytest
import torch

from gradshield.attacks import evolution_strategies, square
from gradshield.attacks.square import _eta, p_selection
from gradshield.errors import GradshieldError
from gradshield.perturbations import norm_of
from tests.helpers import LinearBinary, OneAtATime, spread, targeted_linf_margin, targeted_problem


def check_contract(model, x, y, result, norm, eps, max_queries):
    with torch.no_grad():
        assert torch.equal(model(result.adversarial).argmax(1) != y, result.success)
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert (norm_of(result.perturbation, norm) <= eps * (1 + 1e-5) + 1e-6).all()
    assert (result.queries >= 1).all() and result.queries.max() <= max_queries


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 1.0)])
def test_square_contract(trained_model, test_batch, norm, eps):
    x, y = spread(test_batch, 48)
    trained_model.train()
    result = square(trained_model, x, y, eps=eps, norm=norm, max_queries=50, p_init=0.3,
                    generator=torch.Generator().manual_seed(0))
    assert trained_model.training
    trained_model.eval()
    check_contract(trained_model, x, y, result, norm, eps, 1 + 50)
    clean_wrong = trained_model(x).argmax(1) != y
    assert result.success_rate > clean_wrong.float().mean()
    again = square(trained_model, x, y, eps=eps, norm=norm, max_queries=50, p_init=0.3,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.adversarial, result.adversarial)


def test_square_reference_pieces():
    bump = _eta(7, torch.zeros(1, dtype=torch.float64))
    assert float(bump.pow(2).sum()) == pytest.approx(1.0)
    assert (bump[:3] > 0).all() and (bump[3:] < 0).all()
    schedule = [p_selection(0.8, i, 1000) for i in (0, 1, 2, 10, 100, 999)]
    assert schedule == [0.8, 0.8, 0.4, 0.2, 0.05, 0.8 / 512]


def test_es_matches_the_linear_optimum_in_l2():
    """On a linear margin the NES estimate is unbiased: projected ES-L2 ends within 5 % of the
    optimal margin drop eps * ||w||_2."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, 4, 4, generator=g)
    model = LinearBinary(w, 20.0)
    x = torch.full((4, 3, 4, 4), 0.5)
    y = torch.ones(4, dtype=torch.long)
    result = evolution_strategies(model, x, y, space="additive", eps=0.2, norm="l2", samples=50, steps=60,
                                  generator=g)
    drop = (model(x) - model(result.adversarial))[:, 1]
    optimum = 0.2 * float(w.norm())
    assert not result.success.any()
    assert (drop >= 0.95 * optimum).all() and (drop <= optimum * (1 + 1e-4)).all(), (drop, optimum)


def test_es_on_the_flow_reaches_the_linear_optimum_on_a_ramp():
    """Gradient-free on the flow field: ES-L-inf on the ramp problem (margin linear in the flow)
    ends within 5 % of the optimal drop eps * ||g||_1 (128 flow coordinates: the NES estimate
    needs ~200 antithetic samples per step to get the signs of the small gradients right;
    measured 92 % of the optimum at 50 x 60, 98 % at 200 x 100)."""
    from tests.test_attacks_pgd import assert_near_optimum, ramp_problem

    model, x, y, gradient = ramp_problem()
    eps = 0.4
    result = evolution_strategies(model, x, y, space="flow", eps=eps, norm="linf", samples=200,
                                  steps=100, generator=torch.Generator().manual_seed(0))
    assert_near_optimum(model, x, result, eps * float(gradient.abs().sum()))


@pytest.mark.parametrize("space,norm,eps", [("flow", "linf", 0.3), ("additive", "linf", 8 / 255)])
def test_es_contract_and_chunking(trained_model, test_batch, space, norm, eps):
    x, y = spread(test_batch, 32)
    trained_model.train()
    kwargs = {"space": space, "eps": eps, "norm": norm, "samples": 5, "steps": 4}
    result = evolution_strategies(trained_model, x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    assert trained_model.training
    trained_model.eval()
    check_contract(trained_model, x, y, result, norm, eps, 1 + 4 * (2 * 5 + 1) + 1)
    assert result.success_rate > (trained_model(x).argmax(1) != y).float().mean()
    # the chunking of candidate batches does not change anything (no loss mixes examples); the
    # model runs one image at a time, so its arithmetic does not depend on the chunk either
    model = OneAtATime(trained_model)
    whole, chunked = (evolution_strategies(model, x[:8], y[:8], chunk=chunk,
                                           generator=torch.Generator().manual_seed(0), **kwargs)
                      for chunk in (2048, 7))
    torch.testing.assert_close(chunked.adversarial, whole.adversarial, atol=1e-6, rtol=0)


def test_blackbox_errors(trained_model, test_batch):
    x, y = spread(test_batch, 4)
    for call, match in [
        (lambda: square(trained_model, x, y, eps=0.1, norm="l1"), "norm"),
        (lambda: square(trained_model, x, y, eps=-0.1), "eps"),
        (lambda: square(trained_model, x, y, eps=0.1, max_queries=0), "max_queries"),
        (lambda: square(trained_model, x, y, eps=0.1, p_init=2.0), "p_init"),
        (lambda: evolution_strategies(trained_model, x, y, eps=0.1, space="color"), "space"),
        (lambda: evolution_strategies(trained_model, x, y, eps=0.1, samples=0), "samples"),
        (lambda: evolution_strategies(trained_model, x, y, eps=0.1, sigma=0.0), "sigma"),
        (lambda: evolution_strategies(trained_model, x, (y + 1) % 10, eps=0.1, targeted=True,
                                      labels=(y + 1) % 10), "target"),
    ]:
        with pytest.raises(GradshieldError, match=match):
            call()


def test_targeted_square_and_es_hit_the_target(trained_model, test_batch):
    x, y = spread(test_batch, 16)
    target = (y + 3) % 10
    g = torch.Generator().manual_seed(0)
    for result in (square(trained_model, x, target, eps=24 / 255, max_queries=150, targeted=True, labels=y,
                          generator=g),
                   evolution_strategies(trained_model, x, target, eps=24 / 255, space="additive", steps=20,
                                        samples=10, targeted=True, labels=y, generator=g)):
        with torch.no_grad():
            hit = trained_model(result.adversarial).argmax(1) == target
        assert torch.equal(hit, result.success) and result.success.any()


def test_targeted_square_and_es_reach_every_target_reachable_with_half_the_budget():
    """On GroupMeans the reachable targets are known in closed form (see test_attacks_pgd):
    gradient-free attacks hit no unreachable target, and every target reachable with half the
    budget (margin to spare for a random search)."""
    eps = 0.1
    model, x, y, target, margin = targeted_problem(eps=eps)
    easy = targeted_linf_margin(model, x, target, eps / 2) > 0
    assert 0.2 < easy.float().mean() < 0.8 and (margin > 0).float().mean() > 0.8
    for result in (square(model, x, target, eps=eps, targeted=True, labels=y,
                          generator=torch.Generator().manual_seed(0)),
                   evolution_strategies(model, x, target, eps=eps, space="additive", steps=20,
                                        samples=10, targeted=True, labels=y,
                                        generator=torch.Generator().manual_seed(0))):
        with torch.no_grad():
            assert torch.equal(model(result.adversarial).argmax(1) == target, result.success)
        assert not (result.success & (margin <= 0)).any()
        assert result.success[easy].all(), int((~result.success[easy]).sum())
