"""Gradient-masking diagnostics: each check's logic on constructed outcomes; the model checks
flag a GCM-wrapped model and a constructed zero-gradient defense while passing the vanilla one
(real CIFAR-10 model and images)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradshield.attacks import bpda
from gradshield.defenses.concealment import conceal
from gradshield.errors import GradshieldError
from gradshield.evaluation.diagnostics import (
    BPDA,
    ITERATIVE,
    NOISE,
    SINGLE_STEP,
    TRANSFER,
    AttackRecord,
    Verdict,
    check_black_box,
    check_budget_monotonicity,
    check_finite_differences,
    check_single_step,
    check_unbounded,
    diagnose,
    gradient_health,
)

N = 100
ALL = torch.ones(N, dtype=torch.bool)


def _success(count: int) -> torch.Tensor:
    out = torch.zeros(N, dtype=torch.bool)
    out[:count] = True
    return out


def _rec(name, kind, eps, count, norm="linf"):
    return AttackRecord(name, kind, norm, eps, _success(count))


def test_single_step_check():
    flagged = check_single_step([_rec("fgsm", SINGLE_STEP, 8 / 255, 60),
                                 _rec("pgd", ITERATIVE, 8 / 255, 10)], ALL)
    assert flagged.flagged and flagged.evidence["budgets"]["linf eps=0.0313725"]["single_step"] == 0.6
    fine = check_single_step([_rec("fgsm", SINGLE_STEP, 8 / 255, 60),
                              _rec("pgd", ITERATIVE, 8 / 255, 99)], ALL)
    assert not fine.flagged and not fine.skipped
    skipped = check_single_step([_rec("pgd", ITERATIVE, 8 / 255, 99)], ALL)
    assert skipped.skipped and not skipped.flagged


def test_black_box_check_counts_examples_only_the_other_attack_breaks():
    white = _rec("pgd", ITERATIVE, 0.03, 50)
    assert check_black_box([white, _rec("bpda", BPDA, 0.03, 90)], ALL).flagged
    assert not check_black_box([white, _rec("transfer", TRANSFER, 0.03, 40)], ALL).flagged
    # same rate, but on disjoint examples: 50 % broken only by the noise baseline
    disjoint = AttackRecord("noise", NOISE, "linf", 0.03, ~_success(50))
    finding = check_black_box([white, disjoint], ALL)
    assert finding.flagged
    (case,) = finding.evidence["comparisons"].values()
    assert case["broken_only_by_other"] == 0.5
    # a different budget is not compared
    assert check_black_box([white, _rec("bpda", BPDA, 0.06, 90)], ALL).skipped


def test_budget_check():
    rising = [_rec("pgd", ITERATIVE, e, c) for e, c in [(2, 40), (4, 70), (8, 98)]]
    assert not check_budget_monotonicity(rising, ALL).flagged
    flat = [_rec("pgd", ITERATIVE, e, c) for e, c in [(2, 5), (4, 6), (8, 7)]]
    assert check_budget_monotonicity(flat, ALL).flagged
    falling = [_rec("pgd", ITERATIVE, e, c) for e, c in [(2, 50), (4, 30), (8, 60)]]
    assert check_budget_monotonicity(falling, ALL).flagged
    saturated = [_rec("pgd", ITERATIVE, e, c) for e, c in [(2, 99), (8, 100)]]
    assert not check_budget_monotonicity(saturated, ALL).flagged


def test_rates_are_over_clean_correct_examples():
    mask = _success(50)  # only the first 50 are clean-correct
    fgsm = AttackRecord("fgsm", SINGLE_STEP, "linf", 0.1, ~_success(50))  # only wrong ones
    pgd = _rec("pgd", ITERATIVE, 0.1, 10)
    finding = check_single_step([fgsm, pgd], mask)
    assert not finding.flagged
    assert finding.evidence["budgets"]["linf eps=0.1"] == {
        "single_step": 0.0, "iterative": 0.2, "flagged": False}


def test_bad_records_are_rejected(test_batch, trained_model):
    with pytest.raises(GradshieldError, match="unknown attack kind"):
        AttackRecord("x", "whitebox", "linf", 0.1, ALL)
    x, y = test_batch
    with pytest.raises(GradshieldError, match="one entry per example"):
        diagnose(trained_model, x[:8], y[:8], records=[_rec("pgd", ITERATIVE, 0.1, 3)],
                 run_unbounded=False)


def test_finite_differences_flag_gcm_not_vanilla(test_batch, trained_model):
    x, y = test_batch
    x, y = x[:32], y[:32]
    gen = torch.Generator().manual_seed(0)
    vanilla = check_finite_differences(trained_model, x, y, generator=gen)
    assert not vanilla.flagged
    assert vanilla.evidence["median_relative_error"] < 0.02
    gcm = check_finite_differences(conceal(trained_model), x, y,
                                   generator=torch.Generator().manual_seed(0))
    assert gcm.flagged
    # autograd's directional derivative is ~eps*w = 1e12 times the true rate of change
    assert 1e10 < gcm.evidence["median_abs_ratio"] < 1e13


def test_gradient_health_and_verdict_without_attacks(test_batch, trained_model):
    x, y = test_batch
    x, y = x[:32], y[:32]
    healthy = gradient_health(trained_model, x, y)
    assert not healthy.flagged and healthy.evidence["median_grad_l2"] < 1e3
    gcm = conceal(trained_model)
    masked_health = gradient_health(gcm, x, y)
    # finite but ~1e12 larger: reported as evidence, not flagged by this check
    assert not masked_health.flagged and masked_health.evidence["median_grad_l2"] > 1e9
    verdict = diagnose(gcm, x, y, run_unbounded=False)
    assert isinstance(verdict, Verdict) and verdict.masked
    assert verdict.flagged == ["gradient_disagrees_with_finite_differences"]
    assert "FLAG" in verdict.text() and verdict.to_dict()["masked"]
    assert not diagnose(trained_model, x, y, run_unbounded=False).masked


def _records(model, x, y, *, masked_by: type | None = None, white_box: str = "pgd"):
    """FGSM / PGD-10 (or APGD-CE 10) at 2 and 8/255, random-sign noise and (when ``masked_by``
    names the masking layer's type) BPDA through that layer, on (x, y)."""
    from gradshield.attacks import apgd, bpda, fgsm, pgd

    gen = torch.Generator().manual_seed(0)
    records = [AttackRecord.from_result("fgsm", SINGLE_STEP, "linf", 8 / 255,
                                        fgsm(model, x, y, eps=8 / 255))]
    for k in (2, 8):
        eps = k / 255
        attack = pgd(model, x, y, eps=eps, steps=10) if white_box == "pgd" else apgd(
            model, x, y, eps=eps, steps=10, generator=torch.Generator().manual_seed(k))
        records.append(AttackRecord.from_result(f"{white_box}{k}", ITERATIVE, "linf", eps, attack))
        noise = eps * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)
        with torch.no_grad():
            fooled = model((x + noise).clamp(0, 1)).argmax(1) != y
        records.append(AttackRecord(f"noise{k}", NOISE, "linf", eps, fooled))
        if masked_by is not None:
            adaptive_model = bpda(model, lambda m: isinstance(m, masked_by))
            records.append(AttackRecord.from_result(f"bpda{k}", BPDA, "linf", eps,
                                                    pgd(adaptive_model, x, y, eps=eps, steps=10)))
    return records


@pytest.mark.parametrize("white_box", ["pgd", "apgd"])
def test_diagnose_with_attacks_flags_gcm_and_passes_vanilla(test_batch, trained_model, white_box):
    """What GCM does to any classifier, with PGD or APGD as the white-box attack: its autograd
    gradient is ~1e12 times the function's rate of change (finite differences disagree), and BPDA,
    which restores the model's own gradient, beats the masked white-box attack. Whether the
    unbounded attack on GCM (a random-sign walk) fools every example depends on how the model
    answers noise, so it is not asserted here (see
    test_a_zero_gradient_defense_is_flagged_by_the_unbounded_attack)."""
    from gradshield.defenses.concealment import GradientConcealment

    x, y = test_batch
    x, y = x[:64], y[:64]
    gcm = conceal(trained_model)
    gen = torch.Generator().manual_seed(0)
    masked = diagnose(gcm, x, y, records=_records(gcm, x, y, masked_by=GradientConcealment,
                                                  white_box=white_box),
                      generator=gen, unbounded_examples=64)
    assert {"gradient_free_or_transfer_beats_white_box",
            "gradient_disagrees_with_finite_differences"} <= set(masked.flagged)
    assert not any(f.skipped for f in masked.findings)
    clean = diagnose(trained_model, x, y, records=_records(trained_model, x, y, white_box=white_box),
                     generator=gen, unbounded_examples=64)
    assert not clean.masked, clean.text()
    assert not any(f.skipped for f in clean.findings if f.name != "single_step_beats_iterative")


class RoundTo8Bit(nn.Module):
    """Rounds to the 256 levels of an 8-bit image: the identity on 8-bit images, but its autograd
    gradient is exactly zero, so every white-box gradient step is zero (a shattered gradient)."""

    def forward(self, x):
        return torch.round(x * 255) / 255


def test_a_zero_gradient_defense_is_flagged_by_the_unbounded_attack(test_batch, trained_model):
    """Masking constructed so that the outcome does not depend on the weights: white-box attacks
    cannot move, so even the unbounded attack fools no clean-correct example, success does not
    grow with the budget, and BPDA (identity backward through the rounding) beats them."""
    x, y = test_batch
    x, y = x[:64], y[:64]
    rounded = nn.Sequential(RoundTo8Bit(), trained_model).eval()
    with torch.no_grad():
        assert torch.equal(rounded(x), trained_model(x))  # 8-bit images pass unchanged
    verdict = diagnose(rounded, x, y, records=_records(rounded, x, y, masked_by=RoundTo8Bit),
                       generator=torch.Generator().manual_seed(0), unbounded_examples=64)
    findings = {f.name: f for f in verdict.findings}
    unbounded = findings["unbounded_attack_fails"]
    assert unbounded.flagged and unbounded.evidence["success"] == 0.0, unbounded.summary
    assert {"gradient_free_or_transfer_beats_white_box", "success_flat_in_budget",
            "non_finite_or_zero_gradients"} <= set(verdict.flagged)
    # the same unbounded attack with the gradient restored breaks (nearly) every example
    restored = bpda(rounded, lambda m: isinstance(m, RoundTo8Bit))
    assert not check_unbounded(restored, x, y, max_examples=64).flagged
