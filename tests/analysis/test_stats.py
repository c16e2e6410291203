"""The report's statistics against values computed independently (closed forms and hand counts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pipeline.analysis import stats

Z95 = 1.959963984540054
BOOT = {"level": 0.95, "n_resamples": 2000, "seed": 0}


def _wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_sign_test_exact_binomial_p_and_wilson_interval():
    x = [-1.0] * 8 + [2.0, 3.0] + [0.0, 0.0]  # zeros are not counted
    share, test = stats.sign_test(x, level=0.95)
    assert test.n == 10 and share.estimate == pytest.approx(0.8)
    # P(X >= 8) for Bin(10, 1/2) = (45 + 10 + 1) / 1024, two-sided doubles it
    assert test.p_value == pytest.approx(2 * 56 / 1024)
    assert (share.low, share.high) == pytest.approx(_wilson_by_hand(8, 10))
    assert not test.rejects(0.05) and test.rejects(0.2)


def test_wilson_matches_the_closed_form():
    iv = stats.wilson(33, 64, level=0.95)
    assert iv.estimate == pytest.approx(33 / 64)
    assert (iv.low, iv.high) == pytest.approx(_wilson_by_hand(33, 64))
    assert (iv.low, iv.high) == pytest.approx((0.396, 0.634), abs=1e-3)  # the 51.6 % of 64


def test_wilcoxon_exact_p_of_five_positive_values():
    # All 5 signed ranks positive: 1 of the 2^5 sign patterns on each side.
    assert stats.wilcoxon_test([0.3, 1.0, 2.0, 4.0, 5.0]).p_value == pytest.approx(2 / 32)


def test_mcnemar_exact_on_discordant_prompts_and_paired_difference():
    a = [True] * 20 + [True] + [False] * 9 + [False] * 10
    b = [True] * 20 + [False] + [True] * 9 + [False] * 10
    res = stats.mcnemar_test(a, b, level=0.95, n_resamples=2000, seed=0)
    assert (res.only_a, res.only_b, res.n) == (1, 9, 40)
    assert res.test.p_value == pytest.approx(2 * (1 + 10) / 1024)  # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert res.diff.estimate == pytest.approx(8 / 40)
    assert res.diff.low > 0  # 8 more right under B out of 40, discordant 9:1
    with pytest.raises(ValueError, match="same prompts"):
        stats.mcnemar_test([True], [True, False], **BOOT)
    assert stats.mcnemar_test([True, False], [True, False], **BOOT).test.p_value == 1.0


def test_bootstrap_interval_of_the_mean_near_the_normal_one():
    x = np.random.default_rng(1).normal(0.3, 1.0, 400)
    iv = stats.bootstrap_ci(x, np.mean, level=0.95, n_resamples=4000, seed=3)
    half = Z95 * x.std(ddof=1) / math.sqrt(len(x))
    assert iv.estimate == pytest.approx(x.mean())
    assert iv.low == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert iv.high == pytest.approx(x.mean() + half, abs=0.25 * half)
    assert iv.excludes_zero()
    med = stats.bootstrap_ci(x, np.median, **BOOT)
    assert med.low < np.median(x) < med.high
    # no spread, no interval
    assert stats.bootstrap_ci([0.5, 0.5, 0.5], np.mean, **BOOT) == stats.Interval(0.5, 0.5, 0.5, 0.95)
    with pytest.raises(ValueError, match="finite"):
        stats.bootstrap_ci([1.0, math.nan], np.mean, **BOOT)


def test_slope_and_its_t_interval_by_hand():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, 60)
    y = -1.5 * x + rng.normal(0, 0.3, 60)
    iv, test = stats.slope(x, y, level=0.95)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    se = math.sqrt((resid @ resid) / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean())))
    t = 2.0017174830120923  # t_{0.975, 58}
    assert iv.estimate == pytest.approx(b)
    assert (iv.low, iv.high) == pytest.approx((b - t * se, b + t * se))
    assert test.rejects(0.001)


def test_spearman_equals_pearson_of_ranks_and_its_interval_covers_it():
    rng = np.random.default_rng(11)
    x = rng.normal(size=80)
    y = x + rng.normal(scale=1.0, size=80)
    iv, test = stats.spearman(x, y, **BOOT)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert iv.estimate == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert iv.low < iv.estimate < iv.high and iv.low > 0 and test.rejects(0.01)
    assert test.p_value == pytest.approx(spearman_p_by_hand(iv.estimate, 80), rel=1e-9) and test.n == 80
    # Unrelated data: the interval covers 0 and the test does not reject (both: the report states either)
    noise, noise_test = stats.spearman(x, rng.normal(size=80), **BOOT)
    assert noise.low < 0 < noise.high and not noise_test.rejects(0.05)
    assert noise_test.p_value == pytest.approx(spearman_p_by_hand(noise.estimate, 80), rel=1e-9)


def spearman_p_by_hand(rho: float, n: int) -> float:
    """Two-sided p-value of Spearman's ρ from its t statistic, t = ρ √((n − 2) / (1 − ρ²)), n − 2 degrees of
    freedom."""
    t_stat = rho * math.sqrt((n - 2) / (1 - rho**2))
    return 2 * scipy_stats.t.sf(abs(t_stat), n - 2)


def test_spearman_gap_tells_the_better_predictor():
    rng = np.random.default_rng(5)
    y = rng.normal(size=60)
    good, useless = -y + rng.normal(scale=0.3, size=60), rng.normal(size=60)  # the sign does not matter
    gap = stats.spearman_gap(useless, good, y, **BOOT)
    rx, ry, rz = (np.argsort(np.argsort(v)) for v in (good, useless, y))
    assert gap.estimate == pytest.approx(abs(np.corrcoef(rx, rz)[0, 1]) - abs(np.corrcoef(ry, rz)[0, 1]))
    assert gap.low > 0
    assert stats.spearman_gap(good, useless, y, **BOOT).high < 0
