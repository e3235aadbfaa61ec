"""Every setting gradshield attributes to a paper is the paper's: the suites' budgets and attack
settings, the training presets, the lambda conversions, the IGR form of the FGR paper's Eq. 5.
A changed number here must be a deliberate change, with its source quoted where it is set."""

from __future__ import annotations

import math

import pytest
import torch

from gradshield.defenses.recipes import make_recipe
from gradshield.defenses.regularizers import igr_penalty, input_gradient, paper_fgr_lambda, paper_igr_lambda
from gradshield.evaluation.suites import load_suite
from gradshield.training import PRESETS, learning_rate, preset_config
from tests.test_regularizers import _directional_check, batch, smooth_model

CIFAR = (3, 32, 32)
IMAGENET = (3, 224, 224)


def _table(suite: str, shape=CIFAR) -> dict[str, tuple]:
    return {s.id: (s.attack, s.norm, s.eps_for(shape), {k: v for k, v in s.hyper.items()})
            for s in load_suite(suite).attacks}


def test_gcm_table1_budgets_are_the_papers_at_224_pixels():
    """GCM paper, Table 1 header: FGSM L-inf 2/255, 8/255; PGD L1 400, 1600, L2 2.0, 8.0,
    L-inf 2/255, 8/255; C&W L2 8.0 (10 binary-search steps, lr 1e-2, 10 iterations, Sec. 4.1)."""
    table = _table("gcm-paper", IMAGENET)
    assert {k: (v[0], v[1], round(v[2], 10)) for k, v in table.items()} == {
        "fgsm-linf-2/255": ("fgsm", "linf", round(2 / 255, 10)),
        "fgsm-linf-8/255": ("fgsm", "linf", round(8 / 255, 10)),
        "pgd-l1-400": ("pgd", "l1", 400.0), "pgd-l1-1600": ("pgd", "l1", 1600.0),
        "pgd-l2-2.0": ("pgd", "l2", 2.0), "pgd-l2-8.0": ("pgd", "l2", 8.0),
        "pgd-linf-2/255": ("pgd", "linf", round(2 / 255, 10)),
        "pgd-linf-8/255": ("pgd", "linf", round(8 / 255, 10)),
        "cw-l2-8.0": ("cw_l2", "l2", 8.0)}
    cw = table["cw-l2-8.0"][3]
    assert (cw["binary_search_steps"], cw["lr"], cw["steps"]) == (10, 1e-2, 10)


def test_gcm_table1_on_cifar_uses_gradshields_stated_conversion():
    """Not the paper's: L2 x sqrt(3072/150528) = 1/7, L1 x 3072/150528 = 1/49 (stated in the suite)."""
    table = _table("gcm-paper", CIFAR)
    assert table["pgd-l2-2.0"][2] == pytest.approx(2.0 / 7)
    assert table["pgd-l2-8.0"][2] == pytest.approx(8.0 / 7)
    assert table["pgd-l1-400"][2] == pytest.approx(400 / 49)
    assert table["pgd-l1-1600"][2] == pytest.approx(1600 / 49)
    assert table["pgd-linf-8/255"][2] == pytest.approx(8 / 255)
    notes = load_suite("gcm-paper").source
    assert "GRADSHIELD'S OWN RULE" in notes and "GRADSHIELD'S CHOICE" in notes


def test_gcm_table2_and_ablation_budgets():
    """Table 2: PGD L-inf 2, 4, 6, 8, 10/255; Tables 3-5: FGSM and PGD L-inf 8/255."""
    assert [round(v[2] * 255, 9) for v in _table("gcm-table2").values()] == [2, 4, 6, 8, 10]
    assert {k: (v[0], round(v[2] * 255, 9)) for k, v in _table("gcm-ablation").items()} == {
        "fgsm-linf-8/255": ("fgsm", 8), "pgd-linf-8/255": ("pgd", 8)}


def test_fgr_training_presets_are_the_paper_and_the_authors_code():
    """FGR paper Sec. 5.1: 60 epochs, lr 0.1 dropped by 10 after 30 and 50, momentum 0.9, weight
    decay 5e-4. Authors' code: 80 epochs, lr 0.01, decay at 40 and 60 by 0.1, batch 128."""
    paper, code = PRESETS["fgr-paper"], PRESETS["fgr-code"]
    assert (paper["epochs"], paper["lr"], paper["milestones"], paper["gamma"], paper["momentum"],
            paper["weight_decay"]) == (60, 0.1, (30, 50), 0.1, 0.9, 5e-4)
    assert (code["epochs"], code["lr"], code["milestones"], code["gamma"], code["batch_size"]) == \
        (80, 0.01, (40, 60), 0.1, 128)
    config = preset_config("fgr-paper", epochs=60)
    steps = 10
    lrs = [learning_rate(e * steps, 60 * steps, config.lr, 0, schedule="step", steps_per_epoch=steps,
                         milestones=config.milestones, gamma=config.gamma) for e in range(60)]
    assert lrs[0] == lrs[29] == 0.1
    assert lrs[30] == pytest.approx(0.01) and lrs[49] == pytest.approx(0.01)
    assert lrs[50] == pytest.approx(0.001) and lrs[59] == pytest.approx(0.001)


def test_paper_lambdas_convert_as_stated():
    """FGR paper Sec. 5.3: FGR lambda {400, 700, 1000}, IGR {3000, 5000, 7000}."""
    assert make_recipe("fgr", paper_lam=400).lam == pytest.approx(400 / 128**2)
    assert make_recipe("fgr_adt", paper_lam=1000).lam == pytest.approx(1000 / 128**2)
    assert make_recipe("igr", paper_lam=3000, norm="l2").lam == pytest.approx(3000 / 128)
    assert paper_fgr_lambda(700) == pytest.approx(700 / 16384)
    assert paper_igr_lambda(7000) == pytest.approx(7000 / 128)


def test_the_papers_igr_form_is_the_non_squared_norm_and_its_gradient_is_exact():
    """Eq. 5: L + lambda * ||grad_x L||_2 (not squared); its parameter gradient against float64
    central differences."""
    model, (x, y) = smooth_model(), batch()
    _, grad = input_gradient(model, x, y)
    value = igr_penalty(model, x, y, norm="l2").penalty.detach()
    torch.testing.assert_close(value, grad.flatten(1).norm(dim=1).mean())
    squared = igr_penalty(model, x, y).penalty.detach()
    assert not math.isclose(value.item(), squared.item())
    _directional_check(lambda m, xx, yy: igr_penalty(m, xx, yy, norm="l2").penalty, model, x, y)


def test_the_non_squared_form_needs_the_exact_method():
    from gradshield.errors import GradshieldError

    with pytest.raises(GradshieldError, match="needs method='exact'"):
        make_recipe("igr", norm="l2", method="finite_difference")
    with pytest.raises(GradshieldError, match="norm must be one of"):
        make_recipe("igr", norm="l3")


def test_fgr_table1_attacks_are_the_papers_and_the_authors_code():
    """Table 1 caption: SS and MS with flow budget 0.01 (MS: 20 iterations), OB with SGD and
    c = 10, GF with ES and c = 10; the authors' attacks/gradient.py: sign steps of eps/iters,
    grid_sample with zero padding, align_corners=True (0.01 = 0.155 px at 32 px)."""
    suite = {s.id: s for s in load_suite("fgr-paper").attacks}
    for ident in ("SS", "MS"):
        assert suite[ident].budget == 0.01 and suite[ident].unit == "normalized"
        assert suite[ident].eps_for(CIFAR) == pytest.approx(0.01 * 31 / 2)
        assert suite[ident].hyper["padding"] == "zeros"
    assert (suite["MS"].hyper["steps"], suite["MS"].hyper["rel_step_size"]) == (20, 0.05)
    for ident in ("OB", "OB-eq3"):
        assert suite[ident].attack == "stadv" and suite[ident].budget is None
        assert (suite[ident].hyper["optimizer"], suite[ident].hyper["c"]) == ("sgd", 10.0)
    for ident in ("GF", "GF-eq3"):
        assert suite[ident].attack == "evolution_strategies_penalized" and suite[ident].budget is None
        assert suite[ident].hyper["c"] == 10.0
    assert {suite[i].hyper["balance"] for i in ("OB", "GF")} == {"loss"}
    assert {suite[i].hyper["balance"] for i in ("OB-eq3", "GF-eq3")} == {"distance"}
    assert [s.budget for s in load_suite("fgr-budget-sweep").attacks] == [0.0025, 0.005, 0.01, 0.02, 0.04]
