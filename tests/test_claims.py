"""Claims are judged from constructed per-example outcomes whose verdict is known."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from gradshield.evaluation.claims import (
    DOES_NOT_HOLD,
    HOLDS,
    NOT_SHOWN,
    NOT_TESTABLE,
    evaluate_claim,
)


@dataclass
class FakeOutcome:
    clean: np.ndarray
    robust: np.ndarray

    @property
    def n(self) -> int:
        return len(self.clean)


class FakeResults:
    """outcome(model, attack, ...) from a table {model: (clean rate, robust rate)}: the first
    round(rate * n) examples are correct / robust, so two models' outcomes are nested."""

    def __init__(self, table: dict[str, tuple[float, float]], n: int = 400) -> None:
        self.table, self.n = table, n

    def outcome(self, model, attack, *, suite=None, through=None, examples=None):
        if model not in self.table:
            return None
        clean, robust = self.table[model]
        c = np.arange(self.n) < round(clean * self.n)
        r = np.arange(self.n) < round((clean if attack == "clean" else robust) * self.n)
        return FakeOutcome(c, r & c)


class FakeExperiment:
    def __init__(self, models) -> None:
        self.models, self.grids = models, {}

    def expand(self, names, where):
        return [names] if isinstance(names, str) else list(names)


def _claim(**entry):
    base = {"id": "c", "text": "t", "source": "s", "kind": "greater", "a": "a", "b": "b",
            "suite": "s", "attacks": ["x"]}
    return {**base, **entry}


@pytest.mark.parametrize("a_robust,verdict", [(0.60, HOLDS), (0.41, NOT_SHOWN), (0.20, DOES_NOT_HOLD)])
def test_greater(a_robust, verdict):
    results = FakeResults({"a": (0.9, a_robust), "b": (0.9, 0.40)})
    claim = evaluate_claim(_claim(), FakeExperiment(["a", "b"]), results)
    assert claim.verdict == verdict
    (c,) = claim.comparisons
    assert c.paired.difference == pytest.approx(a_robust - 0.40, abs=1e-9)


@pytest.mark.parametrize("a_robust,verdict", [(0.41, HOLDS), (0.50, NOT_SHOWN), (0.70, DOES_NOT_HOLD)])
def test_equal_within_a_tolerance(a_robust, verdict):
    results = FakeResults({"a": (0.9, a_robust), "b": (0.9, 0.40)}, n=2000)
    claim = evaluate_claim(_claim(kind="equal", tolerance=0.1), FakeExperiment(["a", "b"]), results)
    assert claim.verdict == verdict


def test_best_of_several():
    results = FakeResults({"a": (0.9, 0.8), "b": (0.9, 0.3), "c": (0.9, 0.5)})
    claim = evaluate_claim(_claim(kind="best", b=["b", "c"]), FakeExperiment(list("abc")), results)
    assert claim.verdict == HOLDS and {c.b for c in claim.comparisons} == {"b", "c"}
    results = FakeResults({"a": (0.9, 0.4), "b": (0.9, 0.3), "c": (0.9, 0.8)})
    claim = evaluate_claim(_claim(kind="best", b=["b", "c"]), FakeExperiment(list("abc")), results)
    assert claim.verdict == DOES_NOT_HOLD


def test_closest_clean_pairing_skips_pairs_too_far_apart_and_says_so():
    results = FakeResults({"a1": (0.80, 0.6), "a2": (0.50, 0.45), "b1": (0.79, 0.3),
                           "b2": (0.95, 0.2)})
    entry = _claim(a=["a1", "a2"], b=["b1", "b2"], pairing="closest-clean", clean_within=0.03)
    claim = evaluate_claim(entry, FakeExperiment(["a1", "a2", "b1", "b2"]), results)
    assert [(c.a, c.b) for c in claim.comparisons] == [("a1", "b1")]
    assert claim.verdict == HOLDS
    assert any("a2" in note and "not compared" in note for note in claim.notes)


def test_missing_results_make_a_claim_not_testable():
    claim = evaluate_claim(_claim(b="nothing"), FakeExperiment(["a"]),
                           FakeResults({"a": (0.9, 0.5)}))
    assert claim.verdict == NOT_TESTABLE and claim.notes


def test_ar_compares_over_the_examples_both_models_get_right():
    results = FakeResults({"a": (0.5, 0.5), "b": (1.0, 0.5)})
    claim = evaluate_claim(_claim(metric="ar"), FakeExperiment(["a", "b"]), results)
    (c,) = claim.comparisons
    assert c.rate_a.n == c.rate_b.n == 200 and c.rate_a.value == 1.0 and c.rate_b.value == 1.0
