"""Suite files: built-in suites parse, budgets and units convert as stated, mistakes get clear errors."""

from __future__ import annotations

import pytest
import torch

from gradshield.attacks import random_noise
from gradshield.errors import GradshieldError
from gradshield.evaluation.suites import (
    builtin_suites,
    convert_imagenet_budget,
    load_suite,
    parse_budget,
    parse_suite,
)

CIFAR = (3, 32, 32)


def test_builtin_suites_parse_and_hold_the_papers_tables():
    assert {"gcm-paper", "gcm-table2", "gcm-ablation", "fgr-paper", "adaptive",
            "adaptive-checks", "quickstart", "autoattack"} <= set(builtin_suites())
    gcm = load_suite("gcm-paper")
    by = {(a.attack, a.norm, a.label): a for a in gcm.attacks}
    for level in (2, 8):
        assert by[("fgsm", "linf", f"{level}/255")].eps_for(CIFAR) == pytest.approx(level / 255)
    linf = sorted(a.eps_for(CIFAR) for a in gcm.attacks if a.attack == "pgd" and a.norm == "linf")
    assert linf == pytest.approx([2 / 255, 8 / 255])
    sweep = [a.eps_for(CIFAR) for a in load_suite("gcm-table2").attacks]
    assert sweep == pytest.approx([k / 255 for k in (2, 4, 6, 8, 10)])
    assert sum(a.attack == "pgd" and a.norm == "l2" for a in gcm.attacks) == 2
    assert sum(a.attack == "pgd" and a.norm == "l1" for a in gcm.attacks) == 2
    assert any(a.attack == "cw_l2" for a in gcm.attacks)
    fgr = load_suite("fgr-paper")
    by_id = {a.id: a for a in fgr.attacks}
    assert [a.attack for a in fgr.attacks] == ["flow_single_step", "flow_pgd", "stadv", "stadv",
                                               "evolution_strategies_penalized",
                                               "evolution_strategies_penalized"]
    # the FGR paper's 0.01 in grid_sample units is 0.155 px at 32 px (SS and MS only)
    assert by_id["SS"].eps_for(CIFAR) == pytest.approx(0.155)
    assert by_id["MS"].eps_for(CIFAR) == pytest.approx(0.155)
    assert by_id["MS"].hyper["steps"] == 20
    # OB and GF have no budget in the paper: unbounded, success at any size
    for ident in ("OB", "OB-eq3", "GF", "GF-eq3"):
        assert by_id[ident].threshold_for(CIFAR) is None and "eps" not in by_id[ident].kwargs_for(CIFAR)
        assert by_id[ident].hyper["c"] == 10.0
    assert (by_id["OB"].hyper["balance"], by_id["OB-eq3"].hyper["balance"]) == ("loss", "distance")
    adaptive = load_suite("adaptive")
    assert {a.through for a in adaptive.attacks} == {"model", "bpda", "transfer"}
    assert {a.kind for a in adaptive.attacks} >= {"bpda", "transfer", "gradient-free", "noise"}
    apgd_rows = {(a.hyper["loss"], a.label) for a in adaptive.attacks if a.attack == "apgd"}
    assert apgd_rows == {(loss, f"{k}/255") for loss in ("ce", "dlr") for k in (2, 8)}


def test_autoattack_suite_is_the_standard_version():
    """APGD-CE, APGD-T (DLR, 9 targets), FAB-T (9 targets), Square 5000 queries; L-inf 8/255, 100
    iterations, one restart each; the notes ask for worst-case mode."""
    suite = load_suite("autoattack")
    apgd_ce, apgd_t, fab_t, square = suite.attacks
    assert all(a.norm == "linf" and a.eps_for(CIFAR) == pytest.approx(8 / 255) for a in suite.attacks)
    assert (apgd_ce.attack, apgd_ce.hyper) == ("apgd", {"loss": "ce", "steps": 100})
    assert (apgd_t.attack, apgd_t.hyper) == ("apgd", {"loss": "dlr", "n_target_classes": 9, "steps": 100})
    assert (fab_t.attack, fab_t.hyper) == ("fab", {"n_target_classes": 9, "steps": 100})
    assert fab_t.threshold_for(CIFAR) == pytest.approx(8 / 255)  # minimum-norm: counted within 8/255
    assert square.attack == "square" and square.hyper == {"max_queries": 5001, "p_init": 0.8,
                                                          "rescale_schedule": False}
    assert "worst-case" in suite.description and "--mode worst-case" in suite.source


def test_imagenet_budget_conversion_rule():
    # keep the per-coordinate size: Linf unchanged, L2 * sqrt(d/d_ref) = 1/7, L1 * d/d_ref = 1/49
    assert convert_imagenet_budget(0.5, "linf", CIFAR) == 0.5
    assert convert_imagenet_budget(0.7, "l2", CIFAR) == pytest.approx(0.1)
    assert convert_imagenet_budget(4.9, "l1", CIFAR) == pytest.approx(0.1)
    suite = parse_suite('[[attack]]\nattack = "pgd"\nnorm = "l2"\neps_imagenet = 2.0\n')
    assert suite.attacks[0].eps_for(CIFAR) == pytest.approx(2.0 / 7)
    assert suite.attacks[0].eps_for((3, 224, 224)) == pytest.approx(2.0)


def test_budgets_parse_fractions_and_reject_bad_values():
    assert parse_budget("8/255", "x") == pytest.approx(8 / 255)
    assert parse_budget(0.5, "x") == 0.5
    for bad, message in (("-1", "finite number >= 0"), ("abc", "cannot read"), ("8/0", "cannot read"),
                         (True, "must be a number")):
        with pytest.raises(GradshieldError, match=message):
            parse_budget(bad, "x")
    with pytest.raises(GradshieldError, match=r"attack #1 \(eps\).*>= 0"):
        parse_suite('[[attack]]\nattack = "pgd"\neps = -0.1\n')
    with pytest.raises(GradshieldError, match="needs a budget"):
        parse_suite('[[attack]]\nattack = "pgd"\n')


def test_unknown_attack_key_and_table_are_explained():
    with pytest.raises(GradshieldError, match=r"unknown attack 'pdg'; did you mean 'pgd'"):
        parse_suite('[[attack]]\nattack = "pdg"\neps = "8/255"\n')
    with pytest.raises(GradshieldError, match=r"unknown key 'step'.*did you mean 'steps'"):
        parse_suite('[[attack]]\nattack = "pgd"\neps = "8/255"\nstep = 10\n')
    with pytest.raises(GradshieldError, match=r"unknown top-level key 'atack'.*'attack'"):
        parse_suite('[[atack]]\nattack = "pgd"\n')
    with pytest.raises(GradshieldError, match="steps must be an integer >= 1"):
        parse_suite('[[attack]]\nattack = "pgd"\neps = 0.1\nsteps = 0\n')
    with pytest.raises(GradshieldError, match="share the id"):
        parse_suite('[[attack]]\nattack = "fgsm"\neps = 0.1\n[[attack]]\nattack = "fgsm"\neps = 0.1\n')
    with pytest.raises(GradshieldError, match="eps_normalized is for flow attacks"):
        parse_suite('[[attack]]\nattack = "pgd"\neps_normalized = 0.1\n')
    with pytest.raises(GradshieldError, match="not valid TOML"):
        parse_suite("[[attack]\n")
    with pytest.raises(GradshieldError, match="no built-in suite"):
        load_suite("no-such-suite")


def test_user_suite_file_and_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[defaults]\nsteps = 7\nrandom_start = true\n'
                    '[[attack]]\nattack = "fgsm"\neps = "4/255"\n'
                    '[[attack]]\nattack = "pgd"\nnorm = "l2"\neps = 0.25\nlabel = "quarter"\n')
    suite = load_suite(path)
    assert suite.name == "mine" and suite.origin == str(path)
    fgsm, pgd = suite.attacks
    assert fgsm.hyper == {}  # defaults apply only where the attack takes the key
    assert pgd.hyper == {"steps": 7, "random_start": True}
    assert pgd.id == "pgd-l2-quarter" and pgd.family == "l2"
    assert pgd.kwargs_for(CIFAR) == {"steps": 7, "random_start": True, "eps": 0.25, "norm": "l2"}
    assert suite.digest == load_suite(path).digest
    with pytest.raises(GradshieldError, match="suite file not found"):
        load_suite(tmp_path / "missing.toml")


def test_random_noise_baseline_stays_in_budget():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))
    result = random_noise(model, x, y, eps=0.05, norm="linf", generator=torch.Generator().manual_seed(0))
    assert (result.adversarial - x).abs().max() <= 0.05 + 1e-6
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
    assert torch.equal(result.success, model(result.adversarial).argmax(1) != y)
    assert torch.equal(result.queries, torch.ones(16, dtype=torch.long))


def test_every_attack_declares_its_suite_metadata_next_to_its_code():
    """The registry is filled by the attack modules themselves; suites hold no list of their own."""
    import gradshield.evaluation.suites as suites
    from gradshield.attacks import registered

    attacks = registered()
    assert {"fgsm", "pgd", "apgd", "fab", "cw_l2", "square", "random_noise", "flow_single_step", "flow_pgd",
            "stadv", "evolution_strategies"} <= set(attacks)
    for name, info in attacks.items():
        assert info.function.__module__.startswith("gradshield.attacks."), name
        assert info.space in ("additive", "flow") and info.norms
    assert not hasattr(suites, "ATTACKS") and not hasattr(suites, "random_noise")
    # metadata drives parsing: a fixed-norm attack refuses another norm, a minimum-size one needs no eps
    with pytest.raises(GradshieldError, match="l2 only"):
        parse_suite('[[attack]]\nattack = "cw_l2"\nnorm = "linf"\n')
    with pytest.raises(GradshieldError, match=r"choose one of \('linf', 'l2'\)"):
        parse_suite('[[attack]]\nattack = "square"\nnorm = "l1"\neps = 1.0\n')
    assert parse_suite('[[attack]]\nattack = "stadv"\n').attacks[0].kwargs_for(CIFAR) == {}
