"""Intervals and tests behind the report's words, from scipy.stats and statsmodels (nothing hand-written).

The level of intervals, the bootstrap's resamples and seed are the caller's (``report`` in params.yaml, through
:class:`pipeline.analysis.findings.StatSettings`). Every function returns its estimate with an interval at
``level`` and, for a test, its p-value, so the report prints both and a word such as "displacement" is written
only where a test rejects (:class:`Test.rejects`). Paired data (the same pairs or prompts under two models)
are tested as pairs: a change per pair ``lp − ref`` is one sample, so its bootstrap is the paired bootstrap.

- :func:`bootstrap_ci`: percentile bootstrap interval of a statistic of one sample (``scipy.stats.bootstrap``);
- :func:`sign_test`: the share of values below zero, exact binomial test of 1/2 among the non-zero ones
  (``scipy.stats.binomtest``) with its Wilson interval;
- :func:`wilcoxon_test`: Wilcoxon signed-rank test of a zero median (``scipy.stats.wilcoxon``);
- :func:`wilson`: a proportion with its Wilson interval (``statsmodels.stats.proportion.proportion_confint``);
- :func:`mcnemar_test`: two models' correctness on the same prompts, exact McNemar test on the discordant
  prompts (``statsmodels.stats.contingency_tables.mcnemar``);
- :func:`slope`: least-squares slope with its t interval (``scipy.stats.linregress``);
- :func:`spearman`: rank correlation, its test and a paired bootstrap interval;
- :func:`spearman_gap`: which of two predictors ranks an outcome better (paired bootstrap);
- :func:`holm`: p-values of several tests adjusted for their number (Holm, ``statsmodels`` ``multipletests``).

:func:`fmt_p` and :func:`fmt_number` print p-values and plain numbers as the reports do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as st

# A sample: a list of numbers or a numpy array (polars columns arrive as ``.to_numpy()``).
Floats = Sequence[float] | np.ndarray
Bools = Sequence[bool] | np.ndarray


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, nd: int = 2, scale: float = 1.0, unit: str = "") -> str:
        if not math.isfinite(self.estimate):
            return "n/a"
        e, lo, hi = (v * scale for v in (self.estimate, self.low, self.high))
        return f"{e:+.{nd}f}{unit} [{lo:+.{nd}f}, {hi:+.{nd}f}]"

    def fmt_share(self, nd: int = 0) -> str:
        """As a percentage: ``62% [41%, 79%]``."""
        if not math.isfinite(self.estimate):
            return "n/a"
        return f"{100 * self.estimate:.{nd}f}% [{100 * self.low:.{nd}f}%, {100 * self.high:.{nd}f}%]"


@dataclass(frozen=True)
class Test:
    """A test's name, its p-value and the sample it ran on."""

    name: str
    p_value: float
    n: int

    def rejects(self, alpha: float) -> bool:
        return math.isfinite(self.p_value) and self.p_value < alpha

    def fmt(self) -> str:
        p = fmt_p(self.p_value)
        return f"{self.name}, n = {self.n}, p {p if p.startswith('<') else '= ' + p}"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else "< 1e-4"


def fmt_number(x: Any, nd: int = 2, signed: bool = False) -> str:
    """A float with ``nd`` decimals (and its sign), anything else as ``str``; None and NaN as ``n/a``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return (f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}") if isinstance(x, float) else str(x)


def _arr(x: Floats) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(a)):
        raise ValueError("statistics need finite values; got NaN or infinity")
    return a


def bootstrap_ci(x: Floats, statistic: Callable, *, level: float, n_resamples: int, seed: int) -> Interval:
    """``statistic`` of ``x`` with its percentile bootstrap interval; a sample of fewer than 2 values, or of one
    repeated value, has no interval (its bounds are the estimate)."""
    a = _arr(x)
    if len(a) == 0:
        return Interval(math.nan, math.nan, math.nan, level)
    est = float(statistic(a))
    if len(a) < 2 or np.ptp(a) == 0:
        return Interval(est, est, est, level)
    res = st.bootstrap(
        (a,),
        statistic,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    return Interval(est, float(res.confidence_interval.low), float(res.confidence_interval.high), level)


def sign_test(x: Floats, *, level: float) -> tuple[Interval, Test]:
    """The share of ``x`` below zero among its non-zero values, with the Wilson interval of that share and the
    exact two-sided binomial (sign) test of 1/2."""
    a = _arr(x)
    nz = a[a != 0]
    if len(nz) == 0:
        return Interval(math.nan, math.nan, math.nan, level), Test("sign test", math.nan, 0)
    k = int((nz < 0).sum())
    res = st.binomtest(k, len(nz), 0.5)
    ci = res.proportion_ci(confidence_level=level, method="wilson")
    return Interval(k / len(nz), float(ci.low), float(ci.high), level), Test("sign test", float(res.pvalue), len(nz))


def wilcoxon_test(x: Floats) -> Test:
    """Two-sided Wilcoxon signed-rank test that ``x`` is symmetric about zero (zeros dropped)."""
    a = _arr(x)
    nz = a[a != 0]
    if len(nz) == 0:
        return Test("Wilcoxon signed-rank", math.nan, 0)
    return Test("Wilcoxon signed-rank", float(st.wilcoxon(nz).pvalue), len(nz))


def wilson(k: int, n: int, *, level: float) -> Interval:
    """``k`` of ``n`` with its Wilson interval."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return Interval(math.nan, math.nan, math.nan, level)
    lo, hi = proportion_confint(k, n, alpha=1 - level, method="wilson")
    return Interval(k / n, float(lo), float(hi), level)


@dataclass(frozen=True)
class McNemar:
    """Two models on the same prompts: ``only_a`` prompts right only under A, ``only_b`` only under B."""

    n: int
    only_a: int
    only_b: int
    diff: Interval  # accuracy of B minus accuracy of A
    test: Test


def mcnemar_test(a: Bools, b: Bools, *, level: float, n_resamples: int, seed: int) -> McNemar:
    """Exact McNemar test of equal accuracy for correctness ``a`` and ``b`` on the same prompts (in the same
    order), and the accuracy difference B − A with a paired bootstrap interval over prompts."""
    from statsmodels.stats.contingency_tables import mcnemar

    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"McNemar needs the same prompts under both models: {len(x)} vs {len(y)} answers")
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    table = [[int((x & y).sum()), only_a], [only_b, int((~x & ~y).sum())]]
    p = float(mcnemar(table, exact=True).pvalue) if only_a + only_b else 1.0
    diff = bootstrap_ci(y.astype(float) - x.astype(float), np.mean, level=level, n_resamples=n_resamples, seed=seed)
    return McNemar(len(x), only_a, only_b, diff, Test("exact McNemar", p, len(x)))


def slope(x: Floats, y: Floats, *, level: float) -> tuple[Interval, Test]:
    """Least-squares slope of ``y`` on ``x`` with its t interval, and the t test of a zero slope."""
    xa, ya = _arr(x), _arr(y)
    if len(xa) < 3 or np.ptp(xa) == 0:
        return Interval(math.nan, math.nan, math.nan, level), Test("t test of the slope", math.nan, len(xa))
    res = st.linregress(xa, ya)
    half = float(st.t.ppf(0.5 + level / 2, len(xa) - 2)) * res.stderr
    return (
        Interval(float(res.slope), float(res.slope - half), float(res.slope + half), level),
        Test("t test of the slope", float(res.pvalue), len(xa)),
    )


def _rho(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's ρ along ``axis`` for a whole batch of bootstrap resamples at once (Pearson's r of the ranks,
    which is what ``st.spearmanr`` computes, one resample at a time). A resample with one repeated value has no
    ranks to correlate: ρ is taken as 0 there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.ConstantInputWarning)
        r = st.pearsonr(st.rankdata(u, axis=axis), st.rankdata(v, axis=axis), axis=axis).statistic
    return np.nan_to_num(r, nan=0.0)


def spearman(x: Floats, y: Floats, *, level: float, n_resamples: int, seed: int) -> tuple[Interval, Test]:
    """Spearman's rank correlation with its paired bootstrap interval (pairs resampled together) and test."""
    xa, ya = _arr(x), _arr(y)
    if len(xa) < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Interval(math.nan, math.nan, math.nan, level), Test("Spearman", math.nan, len(xa))
    res = st.spearmanr(xa, ya)

    def rho(u, v, axis=-1):
        return _rho(u, v, axis)

    boot = st.bootstrap(
        (xa, ya),
        rho,
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = boot.confidence_interval
    return (
        Interval(float(res.statistic), float(ci.low), float(ci.high), level),
        Test("Spearman", float(res.pvalue), len(xa)),
    )


def spearman_gap(a: Floats, b: Floats, y: Floats, *, level: float, n_resamples: int, seed: int) -> Interval:
    """``|ρ(b, y)| − |ρ(a, y)|`` (Spearman) with a paired bootstrap interval (triples resampled together): which
    of two predictors ranks ``y`` better; an interval above zero says ``b``."""
    aa, ba, ya = _arr(a), _arr(b), _arr(y)
    if len(ya) < 3 or min(np.ptp(aa), np.ptp(ba), np.ptp(ya)) == 0:
        return Interval(math.nan, math.nan, math.nan, level)

    def gap(u, v, w, axis=-1):
        return np.abs(_rho(v, w, axis)) - np.abs(_rho(u, w, axis))

    est = gap(aa, ba, ya)
    boot = st.bootstrap(
        (aa, ba, ya),
        gap,
        paired=True,
        vectorized=True,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return Interval(float(est), float(boot.confidence_interval.low), float(boot.confidence_interval.high), level)


def holm(p_values: Sequence[float], alpha: float) -> list[float]:
    """Holm-adjusted p-values of a family of tests (``statsmodels.stats.multitest.multipletests``); a test that
    could not run (NaN) counts as p = 1."""
    from statsmodels.stats.multitest import multipletests

    if not len(p_values):
        return []
    ps = [p if math.isfinite(p) else 1.0 for p in p_values]
    return [float(p) for p in multipletests(ps, alpha=alpha, method="holm")[1]]
