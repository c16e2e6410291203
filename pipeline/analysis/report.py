"""The report's figures: every number and finding of the report that puts the training variants side by side,
computed from the stages' tables into one JSON-able structure (:func:`compute_report`).

Rendering that structure as Markdown and PNG plots is :mod:`pipeline.analysis.report_render`, which needs
nothing else; ``findings.json`` is its :func:`findings_record`. Intervals and tests are kept as the dicts of
:class:`pipeline.analysis.stats.Interval` and :class:`~pipeline.analysis.stats.Test`.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.analysis import findings, stats
from pipeline.analysis.findings import Finding, HeldoutStats, StatSettings
from pipeline.training.curves import fixed_set_means

Series = dict[str, list[tuple[int, float]]]  # curve name -> (step, value) points
# The stages' metrics the report quotes, per metrics file
QUOTED_METRICS = {
    "prepare": ("splits", "quarantined"),
    "sample": ("n_candidates", "mean_tokens"),
    "judge": ("judge", "kept", "dropped_tie", "candidate_accuracy"),
    "pairs": ("scenario", "n_train", "n_heldout", "mean_edit_distance_norm"),
}


@dataclass
class VariantInputs:
    """What the report reads of one variant: the evaluation's metrics and its per-pair and per-prompt tables,
    the training history (dvclive) and the fixed-set and probe curves (None when absent)."""

    eval: dict
    pairs: pl.DataFrame  # pair_eval: the held-out pairs after training
    answers: pl.DataFrame  # generations: greedy answers on the test prompts
    history: Series
    fixed: pl.DataFrame | None = None
    probe: pl.DataFrame | None = None


def read_live_history(live_dir: str | Path) -> Series:
    """Per-step metrics that dvclive wrote as ``plots/metrics/<name>.tsv``."""
    out: Series = {}
    for f in sorted(Path(live_dir, "plots", "metrics").glob("*.tsv")):
        with f.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        out[f.stem] = [(int(r["step"]), float(r[f.stem])) for r in rows]
    return out


def fixed_set_series(fixed: pl.DataFrame | None, which: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step means of one fixed set (``heldout`` or ``train``), as plotted: the ones training logged."""
    if fixed is None or fixed.is_empty():
        return {}
    means = fixed_set_means(fixed).filter(pl.col("set") == which).sort("step")
    steps = means["step"].to_list()
    return {
        c: [(st, v) for st, v in zip(steps, means[c].to_list()) if v is not None]
        for c in means.columns
        if c not in ("set", "step")
    }


def probe_series(probe: pl.DataFrame | None) -> Series:
    if probe is None or probe.is_empty():
        return {}
    agg = probe.group_by("step").agg(pl.col("greedy_lp").mean()).sort("step")
    return {"probe_greedy_lp": list(zip(agg["step"].to_list(), agg["greedy_lp"].to_list()))}


def variant_findings(
    name: str, v: VariantInputs, start: pl.DataFrame, s: StatSettings
) -> tuple[HeldoutStats, stats.McNemar, list[Finding]]:
    """Every finding of one variant, each decided by its test (:mod:`pipeline.analysis.findings`)."""
    h = findings.heldout_stats(v.pairs, s)
    before, after = findings.correctness_pairs(start, v.answers, f"{name}: test answers")
    mc, acc = findings.accuracy_finding(name, before, after, s)
    return (
        h,
        mc,
        [
            findings.displacement_finding(name, h, s),
            acc,
            findings.drastic_drop_finding(name, v.fixed, s),
            findings.degradation_finding(name, v.fixed, s),
            findings.squeezing_finding(name, v.probe, h, s),
        ],
    )


def _variant_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Each two variants once, in the order of ``names``."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]


def quoted_metrics(pipeline_metrics: dict[str, dict]) -> dict[str, dict]:
    """Of each stage's metrics, the entries the report quotes (:data:`QUOTED_METRICS`) that are there."""
    return {
        stage: {k: m[k] for k in keys if k in m}
        for stage, keys in QUOTED_METRICS.items()
        if (m := pipeline_metrics.get(stage)) is not None
    }


def accuracy_figures(
    start: pl.DataFrame, variants: dict[str, VariantInputs], mcnemar: dict[str, stats.McNemar], s: StatSettings
) -> dict[str, Any]:
    """Greedy test accuracy of the starting policy and of each variant (Wilson), each variant's change against
    the start (``mcnemar``), and the variants against each other on the same prompts (``between``)."""
    per_variant = {}
    for n, mc in mcnemar.items():
        acc = stats.wilson(int(variants[n].answers["correct"].sum()), len(variants[n].answers), level=s.level)
        per_variant[n] = {
            "accuracy": asdict(acc),
            "change": asdict(mc.diff),
            "only_before": mc.only_a,
            "only_after": mc.only_b,
            "mcnemar": asdict(mc.test),
        }
    between = []
    for a, b in _variant_pairs(list(mcnemar)):
        x, y = findings.correctness_pairs(variants[a].answers, variants[b].answers, f"{a} vs {b}: test answers")
        _, fnd = findings.accuracy_finding(b, x, y, s, against=f"`{a}`")
        between.append({"a": a, "b": b, "finding": asdict(fnd)})
    return {
        "n_test": len(start),
        "start": asdict(stats.wilson(int(start["correct"].sum()), len(start), level=s.level)),
        "variants": per_variant,
        "between": between,
    }


def heldout_figures(
    variants: dict[str, VariantInputs], held: dict[str, HeldoutStats], s: StatSettings
) -> dict[str, Any]:
    """Per variant its held-out statistics and the evaluation's mean log-probs; per two variants the difference
    of their Δ chosen on the pairs both scored (``between``, paired bootstrap and Wilcoxon)."""
    per_variant = {
        n: {
            "stats": h.figures(),
            "ref_w": variants[n].eval.get("heldout", {}).get("ref_w"),
            "lp_w": variants[n].eval.get("heldout", {}).get("lp_w"),
        }
        for n, h in held.items()
    }
    between = []
    for a, b in _variant_pairs(list(held)):
        j = (
            variants[a]
            .pairs.select("pair_id", (pl.col("lp_w") - pl.col("ref_w")).alias("a"))
            .join(variants[b].pairs.select("pair_id", (pl.col("lp_w") - pl.col("ref_w")).alias("b")), on="pair_id")
        )
        if len(j) >= 2:
            diff = (j["b"] - j["a"]).to_numpy()
            between.append(
                {
                    "a": a,
                    "b": b,
                    "n": len(j),
                    "delta_w_difference": asdict(s.boot(diff)),
                    "wilcoxon": asdict(stats.wilcoxon_test(diff)),
                }
            )
    return {"variants": per_variant, "between": between}


def distance_figures(
    variants: dict[str, VariantInputs], held: dict[str, HeldoutStats], distances: pl.DataFrame | None, s: StatSettings
) -> dict[str, Any]:
    """Mean Δ chosen per edit-distance bucket and the slope of Δ chosen on the normalised edit distance: of the
    held-out pairs, and of the trained pairs (the fixed training subset at the last evaluation; claim 1 of
    docs/losses.md is about these) where ``distances`` gives their edit distances."""
    rows = [
        (
            n,
            "held-out",
            variants[n].pairs.with_columns((pl.col("lp_w") - pl.col("ref_w")).alias("d")),
            h.slope,
            h.slope_test,
        )
        for n, h in held.items()
    ]
    trained_slope = {}
    for n in held:
        t = findings.trained_pair_changes(variants[n].fixed, distances)
        if t is not None and len(t):
            sl, test = stats.slope(t["edit_distance_norm"].to_numpy(), t["d"].to_numpy(), level=s.level)
            rows.append((n, "trained (fixed subset)", t, sl, test))
            trained_slope[n] = {"slope": asdict(sl), "test": asdict(test), "n": len(t)}
    buckets = sorted({b for _, _, t, _, _ in rows for b in t["distance_bucket"].unique().to_list()})

    def cell(t: pl.DataFrame, bucket: str) -> dict[str, Any]:
        d = t.filter(pl.col("distance_bucket") == bucket)["d"].to_numpy()
        return {"mean": asdict(s.boot(d)) if len(d) else None, "n": len(d)}

    table = [
        {
            "variant": n,
            "pairs": which,
            "buckets": [cell(t, b) for b in buckets],
            "slope": asdict(sl),
            "test": asdict(test),
        }
        for n, which, t, sl, test in rows
    ]
    return {"buckets": buckets, "rows": table, "trained_pairs_slope": trained_slope}


def predictor_figures(variants: dict[str, VariantInputs], s: StatSettings) -> dict[str, dict] | None:
    """Which predicts the change of held-out lp_w better, edit distance or CHES (Razin et al. 2025)? Per variant
    the Spearman correlations with paired bootstrap intervals and the gap of their absolute values; None when
    a variant's pairs carry no CHES."""
    if not all({"ches", "ches_norm"} <= set(v.pairs.columns) for v in variants.values()):
        return None
    boot: dict[str, Any] = {"level": s.level, "n_resamples": s.n_resamples, "seed": s.seed}
    out = {}
    for n in sorted(variants):
        p = variants[n].pairs
        d = (p["lp_w"] - p["ref_w"]).to_numpy()
        fig = {}
        for col in ("edit_distance_norm", "ches", "ches_norm"):
            rho, t = stats.spearman(p[col].to_numpy(), d, **boot)
            fig[col] = {"rho": asdict(rho), "test": asdict(t)}
        gap = stats.spearman_gap(p["edit_distance_norm"].to_numpy(), p["ches_norm"].to_numpy(), d, **boot)
        fig["gap_ches_norm_minus_edit_distance"] = asdict(gap)
        out[n] = fig
    return out


def curve_figures(variants: dict[str, VariantInputs]) -> dict[str, dict[str, Series]]:
    """The plotted curves per variant: the fixed held-out pairs and training subset at every evaluation, the
    probe prompts' greedy log-prob beside the held-out curves, and the training batches (dvclive)."""
    names = sorted(variants)
    held = {n: fixed_set_series(variants[n].fixed, "heldout") for n in names}
    return {
        "heldout": held,
        "train": {n: fixed_set_series(variants[n].fixed, "train") for n in names},
        "probe": {n: {**probe_series(variants[n].probe), **held[n]} for n in names},
        "history": {n: variants[n].history for n in names if variants[n].history},
    }


def compute_report(
    start_answers: pl.DataFrame,
    variants: dict[str, VariantInputs],
    pipeline_metrics: dict[str, dict],
    s: StatSettings,
    distances: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """Every figure and finding of the report, JSON-able (NaN aside, which :func:`findings.json_safe` clears).
    ``start_answers`` are the starting policy's greedy answers on the test prompts, ``pipeline_metrics`` the
    stages' metrics by stage name, ``distances`` (pair_id, edit_distance_norm, distance_bucket of every pair)
    adds the trained pairs to the edit-distance figures.

    One key per part of the report: ``settings``, ``names`` (the variants, sorted), ``data`` (the stages'
    metrics it quotes), ``accuracy``, ``heldout``, ``distance``, ``predictors`` (None without CHES),
    ``curves`` and ``findings`` (per variant, each :class:`~pipeline.analysis.findings.Finding` as a dict)."""
    names = sorted(variants)
    results = {n: variant_findings(n, variants[n], start_answers, s) for n in names}
    held = {n: results[n][0] for n in names}
    return {
        "settings": asdict(s),
        "names": names,
        "data": quoted_metrics(pipeline_metrics),
        "accuracy": accuracy_figures(start_answers, variants, {n: results[n][1] for n in names}, s),
        "heldout": heldout_figures(variants, held, s),
        "distance": distance_figures(variants, held, distances, s),
        "predictors": predictor_figures(variants, s),
        "curves": curve_figures(variants),
        "findings": {n: [asdict(f) for f in results[n][2]] for n in names},
    }


def findings_record(figures: dict[str, Any]) -> dict[str, Any]:
    """What ``findings.json`` holds of :func:`compute_report`'s figures: the settings; per variant its held-out
    statistics and findings; the accuracy comparisons of the variants; and, where there are any, their
    held-out comparisons (``between``), the trained pairs' slopes and the predictors' correlations."""
    record: dict[str, Any] = {
        "settings": figures["settings"],
        "accuracy_between": figures["accuracy"]["between"],
        "variants": {
            n: {"heldout": figures["heldout"]["variants"][n]["stats"], "findings": figures["findings"][n]}
            for n in figures["names"]
        },
    }
    between = [{k: e[k] for k in ("a", "b", "delta_w_difference", "wilcoxon")} for e in figures["heldout"]["between"]]
    optional = {
        "between": between,
        "trained_pairs_slope": figures["distance"]["trained_pairs_slope"],
        "predictors": figures["predictors"],
    }
    return record | {k: v for k, v in optional.items() if v}
