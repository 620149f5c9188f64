"""Comparison statistics against values worked out by hand (and cross-checked with scipy)."""

from __future__ import annotations

import math

import pytest

from tasks.shadow.stats import sign_test, two_proportion_ztest, wilson_interval, z_critical


def test_z_critical_for_95_percent():
    assert z_critical(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_wilson_interval_8_of_10():
    # p = 0.8, z² = 3.841459: centre = (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half width = 1.416009 * sqrt(0.016 + 0.009604) = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-6)
    assert high == pytest.approx(0.943318, abs=1e-6)


def test_wilson_interval_zero_successes_stays_inside_unit_interval():
    low, high = wilson_interval(0, 20)
    assert low == 0.0
    assert high == pytest.approx(0.161125, abs=1e-6)


def test_wilson_interval_all_successes_and_no_data():
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.838875, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)


def test_two_proportion_ztest_50_of_100_vs_65_of_100():
    # pooled p = 115/200 = 0.575; SE = sqrt(0.575 * 0.425 * (1/100 + 1/100)) = 0.0699106
    # z = 0.15 / 0.0699106 = 2.145596; two-sided p = 0.031905
    result = two_proportion_ztest(50, 100, 65, 100)
    assert result.p1 == 0.5 and result.p2 == 0.65
    assert result.diff == pytest.approx(0.15)
    assert result.z == pytest.approx(2.145596, abs=1e-6)
    assert result.p_value == pytest.approx(0.031905, abs=1e-6)


def test_two_proportion_ztest_sign_follows_the_challenger():
    # 30/200 vs 18/150: challenger lower → negative z; p = 0.419433
    result = two_proportion_ztest(30, 200, 18, 150)
    assert result.z == pytest.approx(-0.807406, abs=1e-6)
    assert result.p_value == pytest.approx(0.419433, abs=1e-6)


def test_two_proportion_ztest_degenerate_pool_is_not_significant():
    result = two_proportion_ztest(0, 50, 0, 70)
    assert result.z == 0.0 and result.p_value == 1.0
    assert two_proportion_ztest(50, 50, 70, 70).p_value == 1.0


def test_two_proportion_ztest_needs_samples():
    with pytest.raises(ValueError, match="n > 0"):
        two_proportion_ztest(0, 0, 1, 10)


def test_sign_test_exact_values():
    # 9 wins, 1 loss: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == pytest.approx(22 / 1024)
    assert sign_test(7, 0) == pytest.approx(2 / 2**7)
    assert sign_test(30, 20) == pytest.approx(0.202639, abs=1e-6)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0


def test_sign_test_is_symmetric_and_monotone():
    ps = [sign_test(w, 20 - w) for w in range(10, 21)]
    assert all(a >= b for a, b in zip(ps, ps[1:], strict=False))
    assert all(math.isclose(sign_test(w, 20 - w), sign_test(20 - w, w)) for w in range(21))
