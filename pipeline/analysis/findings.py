"""The report's findings, each decided by a test: a word is written only where its test rejects.

Inputs are the per-pair and per-prompt tables the stages write (so anyone can recompute every number):
the held-out pairs after training (``pair_eval``), each model's greedy answers on the test prompts
(``generations``: the starting policy's and each variant's, the same prompts), and the fixed-set curves
of training (``fixed_curves``, ``probe_curves``: the same pairs and probe prompts at step 0, before any
update, and every K steps). A :class:`Finding` carries its sentence, whether it fired and its figures.

The rules (``α`` and the interval level come from ``report`` in params.yaml and are printed with every
finding):

- **likelihood displacement**: the mean change of held-out ``lp_w − ref_w`` has a paired bootstrap
  interval below zero *and* the sign test rejects "half the pairs below the reference" with more than half
  below. The mirror case (interval above zero, fewer than half below) is "lp_w rose above the reference".
- **accuracy rose / fell**: the exact McNemar test of the variant against the starting policy on the same
  prompts rejects, and the paired bootstrap interval of the difference excludes zero.
- **drastic drop** (3D-properties): the per-pair change, from step 0 to the last step, of
  ``log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)|`` on the fixed held-out pairs has a median of at least
  ``report.drastic_drop_orders`` orders of magnitude, a bootstrap interval of that median above zero and a
  Wilcoxon test that rejects.
- **degradation**: the step where the fixed *training* subset's mean ``lp_w − ref_w`` peaks (an interior
  step, above zero) is chosen on that subset; on the *held-out* pairs (so the step is not chosen on the data
  that test it) the per-pair fall from that step to the last has an interval above zero and a Wilcoxon
  test that rejects.
- **squeezing**: the per-prompt change of the probe prompts' greedy-decode log-prob from step 0 to the last
  has an interval above zero and a Wilcoxon test that rejects, while held-out ``lp_w`` and ``lp_l`` both
  fell (their intervals below zero).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from pipeline.analysis import stats


@dataclass(frozen=True)
class StatSettings:
    alpha: float
    level: float
    n_resamples: int
    seed: int
    drastic_drop_orders: float

    @classmethod
    def from_params(cls, report) -> StatSettings:
        return cls(report.alpha, report.confidence, report.bootstrap_resamples, report.seed, report.drastic_drop_orders)

    def boot(self, x, statistic=np.mean) -> stats.Interval:
        return stats.bootstrap_ci(x, statistic, level=self.level, n_resamples=self.n_resamples, seed=self.seed)

    def rule(self) -> str:
        return f"{100 * self.level:.0f} % intervals, α = {self.alpha:g}"


@dataclass(frozen=True)
class Finding:
    variant: str
    kind: str
    fired: bool
    text: str
    figures: dict[str, Any] = field(default_factory=dict)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _iv(iv: stats.Interval) -> dict:
    return asdict(iv)


def _t(t: stats.Test) -> dict:
    return asdict(t)


def verdict(test: stats.Test, s: StatSettings) -> str:
    """``"<test>, n = 12, p = 0.03 < α = 0.05"``."""
    p = test.fmt()
    return f"{p} {'<' if test.rejects(s.alpha) else '≥'} α = {s.alpha:g}" if math.isfinite(test.p_value) else p


# --------------------------------------------------------------------------------------------- held-out pairs
@dataclass(frozen=True)
class HeldoutStats:
    n: int
    delta_w: stats.Interval  # mean of lp_w − ref_w, paired bootstrap
    delta_w_median: stats.Interval
    delta_l: stats.Interval
    delta_l_median: stats.Interval
    below: stats.Interval  # share of pairs with lp_w < ref_w (Wilson)
    below_test: stats.Test  # sign test
    wilcoxon_w: stats.Test
    wilcoxon_l: stats.Test
    slope: stats.Interval  # Δlp_w on normalised edit distance
    slope_test: stats.Test

    def figures(self) -> dict:
        return {
            k: (_iv(v) if isinstance(v, stats.Interval) else _t(v) if isinstance(v, stats.Test) else v)
            for k, v in self.__dict__.items()
        }


def heldout_stats(table: pl.DataFrame, s: StatSettings) -> HeldoutStats:
    """Intervals and tests of a ``pair_eval`` table (one row per held-out pair)."""
    d_w = (table["lp_w"] - table["ref_w"]).to_numpy()
    d_l = (table["lp_l"] - table["ref_l"]).to_numpy()
    below, below_test = stats.sign_test(d_w, level=s.level)
    slope, slope_test = stats.slope(table["edit_distance_norm"].to_numpy(), d_w, level=s.level)
    return HeldoutStats(
        len(table),
        s.boot(d_w),
        s.boot(d_w, np.median),
        s.boot(d_l),
        s.boot(d_l, np.median),
        below,
        below_test,
        stats.wilcoxon_test(d_w),
        stats.wilcoxon_test(d_l),
        slope,
        slope_test,
    )


def displacement_finding(variant: str, h: HeldoutStats, s: StatSettings) -> Finding:
    """Did held-out lp_w fall below the reference (or rise above it), by both the interval and the sign test?"""
    if h.n == 0:
        return Finding(variant, "displacement", False, "no held-out pairs: lp_w not measured.")
    figures = {
        "delta_w": _iv(h.delta_w),
        "below": _iv(h.below),
        "sign_test": _t(h.below_test),
        "delta_l": _iv(h.delta_l),
    }
    n_below = round(h.below.estimate * h.below_test.n) if math.isfinite(h.below.estimate) else 0
    detail = (
        f"mean Δlp_w {h.delta_w.fmt()} nats (paired bootstrap), median {h.delta_w_median.fmt()}; "
        f"{n_below} of {h.below_test.n} pairs below the reference ({h.below.fmt_share()}, "
        f"{verdict(h.below_test, s)})"
    )
    rejects = h.below_test.rejects(s.alpha)
    if h.delta_w.high < 0 and rejects and h.below.estimate > 0.5:
        both = (
            f"; lp_l fell too, Δlp_l {h.delta_l.fmt()}: both likelihoods fell"
            if h.delta_l.high < 0
            else f"; Δlp_l {h.delta_l.fmt()}"
        )
        return Finding(
            variant,
            "displacement",
            True,
            f"**likelihood displacement** on {h.n} held-out pairs: {detail}{both}.",
            figures,
        )
    if h.delta_w.low > 0 and rejects and h.below.estimate < 0.5:
        return Finding(
            variant,
            "displacement",
            False,
            f"lp_w **rose above the reference** on {h.n} held-out pairs: {detail}.",
            {**figures, "rose": True},
        )
    return Finding(
        variant,
        "displacement",
        False,
        f"change of held-out lp_w **not significant at this size** ({h.n} pairs): {detail}.",
        figures,
    )


def trained_pair_changes(fixed: pl.DataFrame | None, distances: pl.DataFrame | None) -> pl.DataFrame | None:
    """Per pair of the fixed training subset: Δ chosen ``d`` = lp_w − ref_w at the last evaluation, joined with
    ``distances`` (pair_id, edit_distance_norm and any other columns); None without both tables. Claim
    1 of docs/losses.md (displacement strongest at low edit distance) is about these pairs: on held-out
    pairs the rejected side was never trained on."""
    if fixed is None or distances is None or fixed.is_empty():
        return None
    t = fixed.filter(pl.col("set") == "train")
    if t.is_empty():
        return None
    return (
        t.filter(pl.col("step") == t["step"].max())
        .select("pair_id", (pl.col("lp_w") - pl.col("ref_w")).alias("d"))
        .join(distances, on="pair_id", how="inner")
    )


# --------------------------------------------------------------------------------------------- accuracy
def correctness_pairs(before: pl.DataFrame, after: pl.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``correct`` columns of two ``generations`` tables, aligned by prompt; other prompt sets raise."""
    a, b = set(before["prompt_id"]), set(after["prompt_id"])
    if a != b:
        raise ValueError(
            f"{where}: the two models answered different test prompts ({len(a - b)} only in the first, "
            f"{len(b - a)} only in the second); rerun the policy and evaluate stages"
        )
    j = (
        before.select("prompt_id", pl.col("correct").alias("a"))
        .join(after.select("prompt_id", pl.col("correct").alias("b")), on="prompt_id")
        .sort("prompt_id")
    )
    return j["a"].to_numpy(), j["b"].to_numpy()


def accuracy_finding(
    variant: str, before: np.ndarray, after: np.ndarray, s: StatSettings, against: str = "the starting policy"
) -> tuple[stats.McNemar, Finding]:
    m = stats.mcnemar_test(before, after, level=s.level, n_resamples=s.n_resamples, seed=s.seed)
    acc_a, acc_b = (stats.wilson(int(x.sum()), len(x), level=s.level) for x in (before, after))
    detail = (
        f"{acc_b.fmt_share(1)} vs {acc_a.fmt_share(1)} for {against} (Wilson) on {m.n} prompts; difference "
        f"{m.diff.fmt(1, 100, ' pts')} (paired bootstrap), right only before {m.only_a}, only after "
        f"{m.only_b}: {verdict(m.test, s)}"
    )
    figures = {
        "accuracy": _iv(acc_b),
        "accuracy_before": _iv(acc_a),
        "difference": _iv(m.diff),
        "only_before": m.only_a,
        "only_after": m.only_b,
        "mcnemar": _t(m.test),
    }
    if m.test.rejects(s.alpha) and m.diff.excludes_zero():
        word = "rose" if m.only_b > m.only_a else "fell"
        return m, Finding(variant, "accuracy", True, f"**test accuracy {word}**: {detail}.", figures)
    return m, Finding(
        variant, "accuracy", False, f"test accuracy change **not significant at this size**: {detail}.", figures
    )


# --------------------------------------------------------------------------------------------- fixed-set curves
def _per_pair_at(curves: pl.DataFrame, which: str, step: int, expr: pl.Expr) -> pl.DataFrame:
    return (
        curves.filter((pl.col("set") == which) & (pl.col("step") == step))
        .select("pair_id", expr.alias("v"))
        .sort("pair_id")
    )


def _change(curves: pl.DataFrame, which: str, first: int, last: int, expr: pl.Expr) -> np.ndarray:
    a, b = _per_pair_at(curves, which, first, expr), _per_pair_at(curves, which, last, expr)
    j = a.join(b, on="pair_id", suffix="_last")
    return (j["v_last"] - j["v"]).to_numpy()


def drastic_drop_finding(variant: str, curves: pl.DataFrame | None, s: StatSettings) -> Finding:
    if curves is None or curves.is_empty() or curves["log10_grad_ratio"].is_null().all():
        return Finding(
            variant,
            "drastic drop",
            False,
            "drastic drop not tested: no fixed-set curves with gradient "
            "ratios (the loss has no gradient on both sides, or the train stage predates them).",
        )
    steps = sorted(set(curves["step"]))
    first, last = steps[0], steps[-1]
    change = _change(curves.drop_nulls("log10_grad_ratio"), "heldout", first, last, pl.col("log10_grad_ratio"))
    med, test = s.boot(change, np.median), stats.wilcoxon_test(change)
    detail = (
        f"per held-out pair, log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)| changed from step {first} to step {last} by a "
        f"median of {med.fmt(2)} orders of magnitude (bootstrap), {verdict(test, s)}; the threshold is "
        f"{s.drastic_drop_orders:g} order(s)"
    )
    figures = {
        "median_change": _iv(med),
        "wilcoxon": _t(test),
        "threshold_orders": s.drastic_drop_orders,
        "steps": [first, last],
    }
    if med.estimate >= s.drastic_drop_orders and med.low > 0 and test.rejects(s.alpha):
        return Finding(variant, "drastic drop", True, f"**drastic drop** (3D-properties): {detail}.", figures)
    return Finding(variant, "drastic drop", False, f"no drastic drop shown at this size: {detail}.", figures)


def degradation_finding(variant: str, curves: pl.DataFrame | None, s: StatSettings) -> Finding:
    if curves is None or curves.is_empty():
        return Finding(variant, "degradation", False, "degradation not tested: no fixed-set curves.")
    d_w = pl.col("lp_w") - pl.col("ref_w")
    mean_train = curves.filter(pl.col("set") == "train").group_by("step").agg(d_w.mean().alias("m")).sort("step")
    steps = mean_train["step"].to_list()
    if len(steps) < 3:
        return Finding(
            variant,
            "degradation",
            False,
            f"degradation not tested: {len(steps)} evaluation step(s) of the fixed sets, at least 3 needed.",
        )
    k = int(np.argmax(mean_train["m"].to_numpy()))
    peak, peak_val, last = steps[k], float(mean_train["m"][k]), steps[-1]
    if not (0 < k < len(steps) - 1 and peak_val > 0):
        return Finding(
            variant,
            "degradation",
            False,
            f"no degradation: on the fixed training subset the mean "
            f"lp_w − ref_w has no interior peak above zero (highest {peak_val:+.2f} at step {peak} of "
            f"{steps[0]}–{last}).",
            {"peak_step": peak, "peak_train": peak_val},
        )
    fall = -_change(curves, "heldout", peak, last, d_w)
    mean, test = s.boot(fall), stats.wilcoxon_test(fall)
    detail = (
        f"mean lp_w − ref_w of the fixed training subset peaked at {peak_val:+.2f} at step {peak}; from there "
        f"to step {last} held-out lp_w fell by {mean.fmt()} nats per pair (paired bootstrap), {verdict(test, s)}"
    )
    figures = {"peak_step": peak, "peak_train": peak_val, "heldout_fall": _iv(mean), "wilcoxon": _t(test)}
    if mean.low > 0 and test.rejects(s.alpha):
        return Finding(variant, "degradation", True, f"**degradation**: {detail}.", figures)
    return Finding(variant, "degradation", False, f"degradation **not significant at this size**: {detail}.", figures)


def squeezing_finding(variant: str, probe: pl.DataFrame | None, h: HeldoutStats, s: StatSettings) -> Finding:
    if probe is None or probe.is_empty():
        return Finding(variant, "squeezing", False, "squeezing not tested: no probe curves (train.probe off).")
    steps = sorted(set(probe["step"]))
    first, last = steps[0], steps[-1]
    a = probe.filter(pl.col("step") == first).select("probe", "greedy_lp").sort("probe")
    b = probe.filter(pl.col("step") == last).select("probe", "greedy_lp").sort("probe")
    change = (
        b.join(a, on="probe", suffix="_0").select(pl.col("greedy_lp") - pl.col("greedy_lp_0")).to_series().to_numpy()
    )
    mean, test = s.boot(change), stats.wilcoxon_test(change)
    fell = h.n > 0 and h.delta_w.high < 0 and h.delta_l.high < 0
    detail = (
        f"the greedy decode of {len(change)} probe prompts changed its log-prob by {mean.fmt()} nats per prompt "
        f"from step {first} to {last} (bootstrap), {verdict(test, s)}; held-out Δlp_w {h.delta_w.fmt()}, "
        f"Δlp_l {h.delta_l.fmt()}"
    )
    figures = {"probe_change": _iv(mean), "wilcoxon": _t(test), "chosen_and_rejected_fell": fell}
    if mean.low > 0 and test.rejects(s.alpha) and fell:
        return Finding(variant, "squeezing", True, f"**squeezing**: {detail}.", figures)
    rose = mean.low > 0 and test.rejects(s.alpha)
    why = (
        "the greedy log-prob rose, but held-out lp_w and lp_l did not both fall"
        if rose
        else "the greedy log-prob did not rise significantly"
    )
    return Finding(variant, "squeezing", False, f"no squeezing shown at this size ({why}): {detail}.", figures)
