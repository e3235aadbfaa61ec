"""Rates and paired comparisons against SciPy's independent implementations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from gradshield.evaluation.stats import binomial_two_sided, paired, paired_masks, wilson


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2000), data=st.data())
def test_wilson_interval_equals_scipy(n, data):
    k = data.draw(st.integers(0, n))
    ours = wilson(k, n)
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert ours.low == pytest.approx(ref.low, abs=1e-9)
    assert ours.high == pytest.approx(ref.high, abs=1e-9)
    assert ours.low <= k / n <= ours.high


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), data=st.data())
def test_mcnemar_exact_p_value_equals_scipy_binomial_test(n, data):
    k = data.draw(st.integers(0, n))
    expected = scipy_stats.binomtest(k, n, 0.5).pvalue if n else 1.0
    assert binomial_two_sided(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_paired_difference_and_its_interval():
    a = [True] * 30 + [False] * 10 + [True] * 50 + [False] * 10   # a only: 30, b only: 10
    b = [False] * 30 + [True] * 10 + [True] * 50 + [False] * 10
    result = paired_masks(a, b)
    assert (result.n, result.only_a, result.only_b) == (100, 30, 10)
    assert result.difference == pytest.approx(0.2)
    assert result.low < 0.2 < result.high
    assert result.p_value == pytest.approx(scipy_stats.binomtest(30, 40, 0.5).pvalue)
    assert result.significant()
    same = paired(0, 0, 50)
    assert same.difference == 0 and same.p_value == 1 and not same.significant()
    assert math.isnan(wilson(0, 0).value)


@pytest.mark.parametrize("bad", [(-1, 5), (6, 5)])
def test_bad_counts_are_errors(bad):
    with pytest.raises(ValueError):
        wilson(*bad)
    with pytest.raises(ValueError):
        paired(bad[0], 0, bad[1])
    with pytest.raises(ValueError):
        paired_masks([True, False], [True])
