"""The Markdown report that puts the training variants side by side, with PNG plots."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import polars as pl

from pipeline.analysis import findings as F
from pipeline.analysis import stats as S
from pipeline.data import tagging
from pipeline.training.curves import fixed_set_means

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402



@dataclass
class VariantInputs:
    """What the report reads of one variant: the evaluation's metrics and its per-pair and per-prompt tables,
    the training history (dvclive) and the fixed-set and probe curves (None when absent)."""

    eval: dict
    pairs: pl.DataFrame  # pair_eval: the held-out pairs after training
    answers: pl.DataFrame  # generations: greedy answers on the test prompts
    history: dict[str, list[tuple[int, float]]]
    fixed: pl.DataFrame | None = None
    probe: pl.DataFrame | None = None


def read_live_history(live_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Per-step metrics that dvclive wrote as ``plots/metrics/<name>.tsv``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(live_dir, "plots", "metrics").glob("*.tsv")):
        with f.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        out[f.stem] = [(int(r["step"]), float(r[f.stem])) for r in rows]
    return out


def _f(x: Any, nd: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return (f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}") if isinstance(x, float) else str(x)


def plot_curves(histories: dict[str, dict], keys: list[str], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, hist in histories.items():
            if hist.get(key):
                steps, vals = zip(*hist[key])
                ax.plot(steps, vals, label=name, marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimiser steps done")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(values: dict[str, S.Interval], path: Path, title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(values), 3.4))
    names, ivs = list(values), list(values.values())
    est = [100 * iv.estimate for iv in ivs]
    err = [[100 * (iv.estimate - iv.low) for iv in ivs], [100 * (iv.high - iv.estimate) for iv in ivs]]
    ax.bar(names, est, yerr=err, capsize=4, color="tab:blue")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fixed_set_series(fixed: pl.DataFrame | None, which: str) -> dict[str, list[tuple[int, float]]]:
    """Per-step means of one fixed set (``heldout`` or ``train``), as plotted: the ones training logged."""
    if fixed is None or fixed.is_empty():
        return {}
    means = fixed_set_means(fixed).filter(pl.col("set") == which).sort("step")
    steps = means["step"].to_list()
    return {c: [(st, v) for st, v in zip(steps, means[c].to_list()) if v is not None]
            for c in means.columns if c not in ("set", "step")}


def probe_series(probe: pl.DataFrame | None) -> dict[str, list[tuple[int, float]]]:
    if probe is None or probe.is_empty():
        return {}
    agg = probe.group_by("step").agg(pl.col("greedy_lp").mean()).sort("step")
    return {"probe_greedy_lp": list(zip(agg["step"].to_list(), agg["greedy_lp"].to_list()))}


def variant_findings(name: str, v: VariantInputs, start: pl.DataFrame, s: F.StatSettings
                     ) -> tuple[F.HeldoutStats, S.McNemar, list[F.Finding]]:
    """Every finding of one variant, each decided by its test (:mod:`pipeline.analysis.findings`)."""
    h = F.heldout_stats(v.pairs, s)
    before, after = F.correctness_pairs(start, v.answers, f"{name}: test answers")
    mc, acc = F.accuracy_finding(name, before, after, s)
    return h, mc, [F.displacement_finding(name, h, s), acc, F.drastic_drop_finding(name, v.fixed, s),
                   F.degradation_finding(name, v.fixed, s), F.squeezing_finding(name, v.probe, h, s)]


def predictor_section(names: list[str], variants: dict[str, VariantInputs], s: F.StatSettings,
                      record: dict) -> list[str]:
    """Which predicts the change of held-out lp_w better, edit distance or CHES (Razin et al. 2025)? Spearman
    correlations with paired bootstrap intervals, and the gap of their absolute values."""
    if not all({"ches", "ches_norm"} <= set(variants[n].pairs.columns) for n in names):
        return []
    out = ["### Which predicts the fall of lp_w: edit distance or CHES?", "",
           "Spearman's ρ between Δ chosen and each predictor over the held-out pairs (paired bootstrap interval, "
           "test of ρ = 0), and the gap |ρ(CHES_norm)| − |ρ(edit distance)| with its paired bootstrap interval: "
           "above zero, CHES ranks the pairs by their fall better. Razin et al. (arXiv 2410.08847) expect ρ < 0 "
           "for CHES (higher CHES, more displacement) and ρ > 0 for edit distance.", "",
           "| variant | ρ(Δ, edit distance) | ρ(Δ, CHES) | ρ(Δ, CHES_norm) | gap CHES_norm − edit distance | verdict |",
           "|---|---|---|---|---|---|"]
    boot = {"level": s.level, "n_resamples": s.n_resamples, "seed": s.seed}
    for n in names:
        p = variants[n].pairs
        d = (p["lp_w"] - p["ref_w"]).to_numpy()
        cells, fig = [], {}
        for col in ("edit_distance_norm", "ches", "ches_norm"):
            rho, t = S.spearman(p[col].to_numpy(), d, **boot)
            cells.append(f"{rho.fmt()} (p {S.fmt_p(t.p_value)})" if math.isfinite(rho.estimate) else "n/a")
            fig[col] = {"rho": asdict(rho), "test": asdict(t)}
        gap = S.spearman_gap(p["edit_distance_norm"].to_numpy(), p["ches_norm"].to_numpy(), d, **boot)
        fig["gap_ches_norm_minus_edit_distance"] = asdict(gap)
        verdict = ("CHES_norm predicts better" if gap.low > 0 else "edit distance predicts better" if gap.high < 0
                   else "not distinguishable at this size") if math.isfinite(gap.estimate) else "n/a"
        out.append(f"| {n} | " + " | ".join(cells) + f" | {gap.fmt()} | {verdict} |")
        record.setdefault("predictors", {})[n] = fig
    return out + [""]


def build_report(title: str, start_answers: pl.DataFrame, variants: dict[str, VariantInputs],
                 pipeline_metrics: dict[str, dict], out_dir: Path, s: F.StatSettings,
                 distances: pl.DataFrame | None = None) -> tuple[str, dict]:
    """Write PNGs into ``out_dir``; return the Markdown text (image links relative to it) and every figure
    behind it (``findings.json``). ``distances`` (pair_id, edit_distance_norm, distance_bucket of every pair)
    adds the trained pairs to the edit-distance table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(variants)
    results = {n: variant_findings(n, variants[n], start_answers, s) for n in names}
    record: dict[str, Any] = {"settings": asdict(s), "variants": {}}
    lines = [f"# {title}", "",
             f"Every figure below carries its {100 * s.level:.0f} % interval; a word in bold (\"likelihood "
             f"displacement\", \"drastic drop\", \"degradation\", \"squeezing\", \"accuracy rose/fell\") is written "
             f"only where its test rejects at α = {s.alpha:g}, else the report says \"not significant at this "
             f"size\". Intervals: paired bootstrap over pairs or prompts ({s.n_resamples} resamples, seed {s.seed}) "
             "and Wilson for accuracies; tests: sign test and Wilcoxon signed-rank for changes per pair, exact "
             "McNemar for accuracies on the same prompts. The per-pair and per-prompt tables behind every number "
             "are stage outputs: `data/eval/<variant>/`, `data/train/<variant>/`, `data/policy/generations.parquet`; "
             "this folder's `findings.json` holds every figure.", ""]

    pm = pipeline_metrics
    lines += ["## Data", "",
              f"- prompts: {pm.get('prepare', {}).get('splits', {})}; quarantined "
              f"{pm.get('prepare', {}).get('quarantined', {}).get('total', 0)}",
              f"- candidates: {pm.get('sample', {}).get('n_candidates', 'n/a')} "
              f"(mean {_f(pm.get('sample', {}).get('mean_tokens'), 1)} tokens)",
              f"- judge `{pm.get('judge', {}).get('judge', '?')}`: {pm.get('judge', {}).get('kept', 'n/a')} groups kept, "
              f"{pm.get('judge', {}).get('dropped_tie', 'n/a')} dropped as ties, candidate accuracy "
              f"{_f(100 * (pm.get('judge', {}).get('candidate_accuracy') or 0), 1)}%",
              f"- pairs (scenario {pm.get('pairs', {}).get('scenario', '?')}): {pm.get('pairs', {}).get('n_train', 'n/a')} "
              f"train, {pm.get('pairs', {}).get('n_heldout', 'n/a')} held out; mean normalised edit distance "
              f"{_f(pm.get('pairs', {}).get('mean_edit_distance_norm'))}", ""]

    # Accuracy: each variant against the start, and the variants against each other, on the same prompts
    n_test = len(start_answers)
    start_acc = S.wilson(int(start_answers["correct"].sum()), n_test, level=s.level)
    lines += ["## Accuracy (greedy, test prompts)", "",
              f"{n_test} test prompts; accuracy with its Wilson interval; the change against the starting policy "
              "with its paired bootstrap interval and the exact McNemar test on the prompts only one model got right.",
              "", "| model | accuracy | change vs start | right only before / only after | McNemar p |",
              "|---|---|---|---|---|", f"| starting policy | {start_acc.fmt_share(1)} | | | |"]
    bars = {"start": start_acc}
    for n in names:
        mc = results[n][1]
        acc = S.wilson(int(variants[n].answers["correct"].sum()), len(variants[n].answers), level=s.level)
        bars[n] = acc
        lines.append(f"| {n} | {acc.fmt_share(1)} | {mc.diff.fmt(1, 100, ' pts')} | {mc.only_a} / {mc.only_b} | "
                     f"{S.fmt_p(mc.test.p_value)} |")
    plot_bars(bars, out_dir / "accuracy.png", f"greedy test accuracy ({100 * s.level:.0f} % Wilson)", "%")
    lines += ["", "![accuracy](accuracy.png)", ""]
    between = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = F.correctness_pairs(variants[a].answers, variants[b].answers, f"{a} vs {b}: test answers")
            mc, fnd = F.accuracy_finding(b, x, y, s, against=f"`{a}`")
            between.append({"a": a, "b": b, "finding": asdict(fnd)})
            word = "differ" if fnd.fired else "do not differ significantly"
            lines.append(f"- `{b}` vs `{a}` on the same {mc.n} prompts: {mc.diff.fmt(1, 100, ' pts')} (paired "
                         f"bootstrap), right only under `{a}` {mc.only_a}, only under `{b}` {mc.only_b}: "
                         f"{F.verdict(mc.test, s)}; the two {word} at this size.")
    if between:
        lines.append("")

    # Held-out pairs: changes per pair with intervals
    lines += ["## Log-probabilities of held-out pairs (cf. the 3D-properties paper, Table 1)", "",
              "Per pair, Δ = log-prob after training − under the reference (the starting policy), summed over the "
              "response's tokens; mean and median with paired bootstrap intervals; the share of pairs with "
              "lp_w < ref_w with its Wilson interval and the sign test of one half.", "",
              "| variant | pairs | ref_w → lp_w (mean) | Δ chosen: mean | median | Δ rejected: mean | median | "
              "lp_w < ref_w | sign test p |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        h = results[n][0]
        ev = variants[n].eval.get("heldout", {})
        if not h.n:
            lines.append(f"| {n} | 0 | | | | | | | |")
            continue
        lines.append(f"| {n} | {h.n} | {_f(ev.get('ref_w'))} → {_f(ev.get('lp_w'))} | {h.delta_w.fmt()} | "
                     f"{h.delta_w_median.fmt()} | {h.delta_l.fmt()} | {h.delta_l_median.fmt()} | "
                     f"{h.below.fmt_share()} | {S.fmt_p(h.below_test.p_value)} |")
    lines.append("")
    for i, a in enumerate(names):  # variants against each other on the same pairs
        for b in names[i + 1:]:
            j = variants[a].pairs.select("pair_id", (pl.col("lp_w") - pl.col("ref_w")).alias("a")).join(
                variants[b].pairs.select("pair_id", (pl.col("lp_w") - pl.col("ref_w")).alias("b")), on="pair_id")
            if len(j) >= 2:
                diff = (j["b"] - j["a"]).to_numpy()
                iv, t = s.boot(diff), S.wilcoxon_test(diff)
                verdict = "differ" if iv.excludes_zero() and t.rejects(s.alpha) else "do not differ significantly"
                lines.append(f"- Δ chosen, `{b}` − `{a}` on the same {len(j)} pairs: {iv.fmt()} nats (paired bootstrap), "
                             f"{F.verdict(t, s)}: the two {verdict} at this size.")
                record.setdefault("between", []).append({"a": a, "b": b, "delta_w_difference": asdict(iv),
                                                         "wilcoxon": asdict(t)})
    lines += ["", "### Change of lp_w by normalised edit distance", "",
              "Mean Δ chosen per bucket (paired bootstrap), and the least-squares slope of Δ chosen on the normalised "
              "edit distance with its t interval. REFERENCE claim 1: training on pairs of low edit distance displaces "
              "the chosen most, i.e. a positive slope *on the trained pairs* (the fixed training subset, Δ at the last "
              "evaluation). On held-out pairs the rejected side was never trained on, so a slope there can only come "
              "from what else goes with the distance (with `pairs.source: constructed` the edit kind is drawn "
              "independently of the chosen, and the held-out slope should be flat).", ""]
    trained = {n: F.trained_pair_changes(variants[n].fixed, distances) for n in names}
    rows = [(n, "held-out", variants[n].pairs.with_columns((pl.col("lp_w") - pl.col("ref_w")).alias("d")),
             results[n][0].slope, results[n][0].slope_test) for n in names]
    for n in names:
        if trained[n] is not None and len(trained[n]):
            sl, t = S.slope(trained[n]["edit_distance_norm"].to_numpy(), trained[n]["d"].to_numpy(), level=s.level)
            rows.append((n, "trained (fixed subset)", trained[n], sl, t))
            record.setdefault("trained_pairs_slope", {})[n] = {"slope": asdict(sl), "test": asdict(t),
                                                              "n": len(trained[n])}
    buckets = sorted({b for _, _, t, _, _ in rows for b in t["distance_bucket"].unique().to_list()})
    lines += ["| variant | pairs | " + " | ".join(buckets) + " | slope |", "|---|---|" + "---|" * (len(buckets) + 1)]
    for n, which, t, sl, test in rows:
        cells = []
        for b in buckets:
            d = t.filter(pl.col("distance_bucket") == b)["d"].to_numpy()
            cells.append(f"{s.boot(d).fmt()} (n={len(d)})" if len(d) else "–")
        slope = f"{sl.fmt()} ({F.verdict(test, s)})" if math.isfinite(sl.estimate) else "n/a (one edit distance)"
        lines.append(f"| {n} | {which} | " + " | ".join(cells) + f" | {slope} |")
    lines.append("")

    lines += predictor_section(names, variants, s, record)

    # Curves on the fixed sets (the same pairs at every evaluation) and the training batches
    held = {n: fixed_set_series(variants[n].fixed, "heldout") for n in names}
    train = {n: fixed_set_series(variants[n].fixed, "train") for n in names}
    probe = {n: {**probe_series(variants[n].probe), **held[n]} for n in names}
    if any(held.values()):
        plot_curves(held, ["lp_w", "lp_l", "delta_margin"], out_dir / "logprobs.png",
                    "fixed held-out pairs: mean summed log-probs and the margin Δw − Δl")
        plot_curves(train, ["delta_w", "delta_l", "displaced_share"], out_dir / "displacement.png",
                    "fixed training subset: log-ratio to the reference and share with lp_w < ref_w")
        plot_curves(held, ["log10_grad_ratio"], out_dir / "gradients.png",
                    "fixed held-out pairs: median log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)|")
        plot_curves(probe, ["probe_greedy_lp", "delta_w", "delta_l"], out_dir / "squeezing.png",
                    "greedy decode of the probe prompts vs held-out chosen/rejected log-ratio")
        lines += ["## Training curves on fixed sets", "",
                  "Scored at step 0 (the starting policy, before any update), every `train.eval_every` steps and "
                  "after the last step, on the same pairs for every variant: all held-out pairs and a fixed subset "
                  "of training pairs (`data/train/<variant>/fixed_curves.parquet`).", "",
                  "![log-probs](logprobs.png)", "", "![displacement](displacement.png)", "",
                  "Gradient magnitudes measured against the probabilities (REFERENCE claim 2a; for DPO the ratio is "
                  "π(y_w)/π(y_l)), and the log-prob of the greedy decode of fixed probe prompts (claim 5).", "",
                  "![gradients](gradients.png)", "", "![squeezing](squeezing.png)", ""]
    hist = {n: variants[n].history for n in names if variants[n].history}
    if hist:
        plot_curves(hist, ["loss", "accuracy", "grad_norm"], out_dir / "loss.png",
                    "training batches (a different batch each step): loss, pair accuracy, gradient norm")
        lines += ["Loss on the training batches (each step's own batch, so this curve also shows which pairs were "
                  "drawn):", "", "![loss](loss.png)", ""]

    lines += ["## Findings", "", f"Each decided by its test ({s.rule()}); the rules are in "
              "`pipeline/analysis/findings.py`.", ""]
    for n in names:
        h, mc, fs = results[n]
        record["variants"][n] = {"heldout": h.figures(), "findings": [asdict(f) for f in fs]}
        for f in fs:
            lines.append(f"- `{n}`: {f.text}")
    record["accuracy_between"] = between
    lines.append("")
    return "\n".join(lines), record


# ============================================================================================ scenarios
# The data scenarios of the 3D-properties paper (Yan et al. 2024, arXiv 2406.07327): where the chosen /
# rejected responses come from, e.g. "gold/policy"
SCENARIO_LABELS = {k: f"{c}/{r}" for k, (c, r) in tagging.SCENARIO_SOURCES.items()}


def _pct(x: Any, nd: int = 0) -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) else f"{100 * x:.{nd}f}%"


# (row label, value of one scenario's {"pairs": ..., "eval": ...} as text)
_SCENARIO_ROWS: list[tuple[str, Any]] = [
    ("train pairs", lambda p, e: _f(p.get("n_train"))),
    ("held-out pairs", lambda p, e: _f(p.get("n_heldout"))),
    ("chosen: log-prob per token under the starting policy",
     lambda p, e: _f((p.get("on_policy") or {}).get("chosen_policy_logprob_per_token"), 3)),
    ("rejected: log-prob per token under the starting policy",
     lambda p, e: _f((p.get("on_policy") or {}).get("rejected_policy_logprob_per_token"), 3)),
    ("held-out chosen before (ref_w)", lambda p, e: _f((e.get("heldout") or {}).get("ref_w"))),
    ("held-out chosen after (lp_w)", lambda p, e: _f((e.get("heldout") or {}).get("lp_w"))),
    ("Δ chosen (lp_w − ref_w)", lambda p, e: _f((e.get("heldout") or {}).get("delta_w"), signed=True)),
    ("held-out rejected before (ref_l)", lambda p, e: _f((e.get("heldout") or {}).get("ref_l"))),
    ("held-out rejected after (lp_l)", lambda p, e: _f((e.get("heldout") or {}).get("lp_l"))),
    ("Δ rejected (lp_l − ref_l)", lambda p, e: _f((e.get("heldout") or {}).get("delta_l"), signed=True)),
    ("held-out pairs with lp_w < ref_w", lambda p, e: _pct((e.get("heldout") or {}).get("displaced_share"))),
    ("held-out pair accuracy (lp_w − lp_l > ref_w − ref_l)",
     lambda p, e: _pct((e.get("heldout") or {}).get("pair_accuracy"))),
    ("test accuracy before (starting policy)", lambda p, e: _pct(e.get("test_accuracy_before"), 1)),
    ("test accuracy after", lambda p, e: _pct(e.get("test_accuracy"), 1)),
    ("mean normalised edit distance chosen↔rejected", lambda p, e: _f(p.get("mean_edit_distance_norm"), 3)),
]


def scenario_table(rows: list[dict], variant: str) -> str:
    """The data scenarios of Yan et al. 2024 (arXiv 2406.07327) side by side for one train variant (cf. its
    Tables 1 and 2): one column per scenario, one row per quantity. Each row of ``rows`` is one experiment: ``{"scenario": k,
    "status": "done" | "failed", "experiment": name, "pairs": <metrics/pairs.json>, "eval":
    <metrics/eval/<variant>.json>}``. A missing value reads n/a, a failed experiment's column failed."""
    rows = sorted(rows, key=lambda r: r["scenario"])
    header = [f"{r['scenario']}: {SCENARIO_LABELS.get(r['scenario'], '?')}" for r in rows]
    lines = [f"# Data scenarios side by side (`{variant}`)", "",
             "Each column is one DVC experiment that rebuilt the pairs with `pairs.scenario` = k (the header names "
             "where the chosen / rejected responses come from: the policy's samples, the dataset's gold solution or "
             f"another model) and trained and evaluated `{variant}` on them; everything else is the same. "
             "The log-probs under the starting policy say how on-policy each side is; *before* is the reference "
             "model and *after* the trained one (summed over the response's tokens, mean over held-out pairs). "
             "REFERENCE claims that scenario 1 (both sides sampled from the policy) shows the mildest "
             "3D-properties: lp_w falls least there, i.e. its Δ chosen is the highest.", ""]
    done = [r for r in rows if r.get("status") == "done"
            and isinstance(((r.get("eval") or {}).get("heldout") or {}).get("delta_w"), (int, float))]
    if len(done) >= 2:
        best = max(done, key=lambda r: r["eval"]["heldout"]["delta_w"])
        lines += [f"In this run lp_w falls least in scenario {best['scenario']} "
                  f"(Δ chosen {best['eval']['heldout']['delta_w']:+.2f})"
                  + (", as claimed." if best["scenario"] == 1 else
                     (", not in scenario 1." if any(r["scenario"] == 1 for r in done) else
                      " (scenario 1 is not among the finished ones).")), ""]
    if not rows:
        return "\n".join(lines + ["(no scenarios)", ""])
    lines += ["| | " + " | ".join(header) + " |", "|---|" + "---|" * len(rows)]
    lines.append("| experiment | " + " | ".join(f"`{r.get('experiment')}`" if r.get("experiment") else "n/a"
                                                for r in rows) + " |")
    lines.append("| status | " + " | ".join("done" if r.get("status") == "done" else "**failed**" for r in rows) + " |")
    for label, value in _SCENARIO_ROWS:
        cells = [value(r.get("pairs") or {}, r.get("eval") or {}) if r.get("status") == "done" else "failed"
                 for r in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
