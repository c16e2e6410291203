"""The report's Markdown and PNG plots, from the figures of :func:`pipeline.analysis.report.compute_report`
alone (or the same figures read back from JSON): nothing here reads a table or runs a test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

from pipeline.analysis.findings import StatSettings, verdict
from pipeline.analysis.stats import Interval, Test, fmt_number, fmt_p

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _interval(d: dict) -> Interval:
    """An interval of the figures; JSON's null is the NaN it was written from."""
    return Interval(**{k: math.nan if v is None else v for k, v in d.items()})


def _test(d: dict) -> Test:
    return Test(d["name"], math.nan if d["p_value"] is None else d["p_value"], d["n"])


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


def plot_bars(values: dict[str, Interval], path: Path, title: str, ylabel: str) -> None:
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


def header_section(title: str, s: StatSettings) -> list[str]:
    return [
        f"# {title}",
        "",
        f'Every figure below carries its {100 * s.level:.0f} % interval; a word in bold ("likelihood '
        f'displacement", "drastic drop", "degradation", "squeezing", "accuracy rose/fell") is written '
        f'only where its test rejects at α = {s.alpha:g}, else the report says "not significant at this '
        f'size". Intervals: paired bootstrap over pairs or prompts ({s.n_resamples} resamples, seed {s.seed}) '
        "and Wilson for accuracies; tests: sign test and Wilcoxon signed-rank for changes per pair, exact "
        "McNemar for accuracies on the same prompts. The per-pair and per-prompt tables behind every number "
        "are stage outputs: `data/eval/<variant>/`, `data/train/<variant>/`, `data/policy/generations.parquet`; "
        "`reports/findings.json` holds each finding and the intervals and tests behind it.",
        "",
    ]


def data_section(data: dict[str, dict]) -> list[str]:
    prepare, sample, judge, pairs = (data.get(k, {}) for k in ("prepare", "sample", "judge", "pairs"))
    return [
        "## Data",
        "",
        f"- prompts: {prepare.get('splits', {})}; quarantined {prepare.get('quarantined', {}).get('total', 0)}",
        f"- candidates: {sample.get('n_candidates', 'n/a')} (mean {fmt_number(sample.get('mean_tokens'), 1)} tokens)",
        f"- judge `{judge.get('judge', '?')}`: {judge.get('kept', 'n/a')} groups kept, "
        f"{judge.get('dropped_tie', 'n/a')} dropped as ties, candidate accuracy "
        f"{fmt_number(100 * (judge.get('candidate_accuracy') or 0), 1)}%",
        f"- pairs (scenario {pairs.get('scenario', '?')}): {pairs.get('n_train', 'n/a')} train, "
        f"{pairs.get('n_heldout', 'n/a')} held out; mean normalised edit distance "
        f"{fmt_number(pairs.get('mean_edit_distance_norm'))}",
        "",
    ]


def accuracy_section(accuracy: dict[str, Any], s: StatSettings, out_dir: Path) -> list[str]:
    """The accuracy table and its bar plot (``accuracy.png``), then the variants against each other."""
    start = _interval(accuracy["start"])
    lines = [
        "## Accuracy (greedy, test prompts)",
        "",
        f"{accuracy['n_test']} test prompts; accuracy with its Wilson interval; the change against the starting "
        "policy with its paired bootstrap interval and the exact McNemar test on the prompts only one model got "
        "right.",
        "",
        "| model | accuracy | change vs start | right only before / only after | McNemar p |",
        "|---|---|---|---|---|",
        f"| starting policy | {start.fmt_share(1)} | | | |",
    ]
    bars = {"start": start}
    for n, v in accuracy["variants"].items():
        bars[n] = _interval(v["accuracy"])
        lines.append(
            f"| {n} | {bars[n].fmt_share(1)} | {_interval(v['change']).fmt(1, 100, ' pts')} | "
            f"{v['only_before']} / {v['only_after']} | {fmt_p(_test(v['mcnemar']).p_value)} |"
        )
    plot_bars(bars, out_dir / "accuracy.png", f"greedy test accuracy ({100 * s.level:.0f} % Wilson)", "%")
    lines += ["", "![accuracy](accuracy.png)", ""]
    for e in accuracy["between"]:
        a, b, f = e["a"], e["b"], e["finding"]["figures"]
        test = _test(f["mcnemar"])
        word = "differ" if e["finding"]["fired"] else "do not differ significantly"
        lines.append(
            f"- `{b}` vs `{a}` on the same {test.n} prompts: {_interval(f['difference']).fmt(1, 100, ' pts')} "
            f"(paired bootstrap), right only under `{a}` {f['only_before']}, only under `{b}` "
            f"{f['only_after']}: {verdict(test, s)}; the two {word} at this size."
        )
    return lines + ([""] if accuracy["between"] else [])


def heldout_section(heldout: dict[str, Any], s: StatSettings) -> list[str]:
    """Per variant the changes of the held-out pairs' log-probs, then the variants against each other."""
    lines = [
        "## Log-probabilities of held-out pairs (cf. the 3D-properties paper, Table 1)",
        "",
        "Per pair, Δ = log-prob after training − under the reference (the starting policy), summed over the "
        "response's tokens; mean and median with paired bootstrap intervals; the share of pairs with "
        "lp_w < ref_w with its Wilson interval and the sign test of one half.",
        "",
        "| variant | pairs | ref_w → lp_w (mean) | Δ chosen: mean | median | Δ rejected: mean | median | "
        "lp_w < ref_w | sign test p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, v in heldout["variants"].items():
        h = v["stats"]
        if not h["n"]:
            lines.append(f"| {n} | 0 | | | | | | | |")
            continue
        cells = [_interval(h[k]).fmt() for k in ("delta_w", "delta_w_median", "delta_l", "delta_l_median")]
        lines.append(
            f"| {n} | {h['n']} | {fmt_number(v['ref_w'])} → {fmt_number(v['lp_w'])} | "
            + " | ".join(cells)
            + f" | {_interval(h['below']).fmt_share()} | "
            f"{fmt_p(_test(h['below_test']).p_value)} |"
        )
    lines.append("")
    for e in heldout["between"]:
        iv, t = _interval(e["delta_w_difference"]), _test(e["wilcoxon"])
        word = "differ" if iv.excludes_zero() and t.rejects(s.alpha) else "do not differ significantly"
        lines.append(
            f"- Δ chosen, `{e['b']}` − `{e['a']}` on the same {e['n']} pairs: {iv.fmt()} nats (paired "
            f"bootstrap), {verdict(t, s)}: the two {word} at this size."
        )
    return lines


def distance_section(distance: dict[str, Any], s: StatSettings) -> list[str]:
    buckets = distance["buckets"]
    lines = [
        "",
        "### Change of lp_w by normalised edit distance",
        "",
        "Mean Δ chosen per bucket (paired bootstrap), and the least-squares slope of Δ chosen on the normalised "
        "edit distance with its t interval. Claim 1 (docs/losses.md): training on pairs of low edit distance displaces "
        "the chosen most, i.e. a positive slope *on the trained pairs* (the fixed training subset, Δ at the last "
        "evaluation). On held-out pairs the rejected side was never trained on, so a slope there can only come "
        "from what else goes with the distance (with `pairs.source: constructed` the edit kind is drawn "
        "independently of the chosen, and the held-out slope should be flat).",
        "",
        "| variant | pairs | " + " | ".join(buckets) + " | slope |",
        "|---|---|" + "---|" * (len(buckets) + 1),
    ]
    for row in distance["rows"]:
        cells = [f"{_interval(c['mean']).fmt()} (n={c['n']})" if c["n"] else "–" for c in row["buckets"]]
        sl = _interval(row["slope"])
        slope = (
            f"{sl.fmt()} ({verdict(_test(row['test']), s)})"
            if math.isfinite(sl.estimate)
            else "n/a (one edit distance)"
        )
        lines.append(f"| {row['variant']} | {row['pairs']} | " + " | ".join(cells) + f" | {slope} |")
    return lines + [""]


def predictor_section(predictors: dict[str, dict] | None) -> list[str]:
    """Spearman's ρ of Δ chosen with edit distance and with CHES, and which ranks the pairs better."""
    if predictors is None:
        return []
    lines = [
        "### Which predicts the fall of lp_w: edit distance or CHES?",
        "",
        "Spearman's ρ between Δ chosen and each predictor over the held-out pairs (paired bootstrap interval, "
        "test of ρ = 0), and the gap |ρ(CHES_norm)| − |ρ(edit distance)| with its paired bootstrap interval: "
        "above zero, CHES ranks the pairs by their fall better. Razin et al. (arXiv 2410.08847) expect ρ < 0 "
        "for CHES (higher CHES, more displacement) and ρ > 0 for edit distance.",
        "",
        "| variant | ρ(Δ, edit distance) | ρ(Δ, CHES) | ρ(Δ, CHES_norm) | gap CHES_norm − edit distance | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for n, fig in predictors.items():
        cells = []
        for col in ("edit_distance_norm", "ches", "ches_norm"):
            rho, t = _interval(fig[col]["rho"]), _test(fig[col]["test"])
            cells.append(f"{rho.fmt()} (p {fmt_p(t.p_value)})" if math.isfinite(rho.estimate) else "n/a")
        gap = _interval(fig["gap_ches_norm_minus_edit_distance"])
        word = (
            (
                "CHES_norm predicts better"
                if gap.low > 0
                else "edit distance predicts better"
                if gap.high < 0
                else "not distinguishable at this size"
            )
            if math.isfinite(gap.estimate)
            else "n/a"
        )
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {gap.fmt()} | {word} |")
    return lines + [""]


def curves_section(curves: dict[str, dict], out_dir: Path) -> list[str]:
    """The fixed-set curves (the same pairs at every evaluation) and the training batches, as PNGs."""
    lines = []
    if any(curves["heldout"].values()):
        plot_curves(
            curves["heldout"],
            ["lp_w", "lp_l", "delta_margin"],
            out_dir / "logprobs.png",
            "fixed held-out pairs: mean summed log-probs and the margin Δw − Δl",
        )
        plot_curves(
            curves["train"],
            ["delta_w", "delta_l", "displaced_share"],
            out_dir / "displacement.png",
            "fixed training subset: log-ratio to the reference and share with lp_w < ref_w",
        )
        plot_curves(
            curves["heldout"],
            ["log10_grad_ratio"],
            out_dir / "gradients.png",
            "fixed held-out pairs: median log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)|",
        )
        plot_curves(
            curves["probe"],
            ["probe_greedy_lp", "delta_w", "delta_l"],
            out_dir / "squeezing.png",
            "greedy decode of the probe prompts vs held-out chosen/rejected log-ratio",
        )
        lines += [
            "## Training curves on fixed sets",
            "",
            "Scored at step 0 (the starting policy, before any update), every `train.eval_every` steps and "
            "after the last step, on the same pairs for every variant: all held-out pairs and a fixed subset "
            "of training pairs (`data/train/<variant>/fixed_curves.parquet`).",
            "",
            "![log-probs](logprobs.png)",
            "",
            "![displacement](displacement.png)",
            "",
            "Gradient magnitudes measured against the probabilities (claim 2a of docs/losses.md; for DPO the ratio is "
            "π(y_w)/π(y_l)), and the log-prob of the greedy decode of fixed probe prompts (claim 5).",
            "",
            "![gradients](gradients.png)",
            "",
            "![squeezing](squeezing.png)",
            "",
        ]
    if curves["history"]:
        plot_curves(
            curves["history"],
            ["loss", "accuracy", "grad_norm"],
            out_dir / "loss.png",
            "training batches (a different batch each step): loss, pair accuracy, gradient norm",
        )
        lines += [
            "Loss on the training batches (each step's own batch, so this curve also shows which pairs were drawn):",
            "",
            "![loss](loss.png)",
            "",
        ]
    return lines


def findings_section(found: dict[str, list[dict]], s: StatSettings) -> list[str]:
    lines = [
        "## Findings",
        "",
        f"Each decided by its test ({s.rule()}); the rules are in `pipeline/analysis/findings.py`.",
        "",
    ]
    lines += [f"- `{n}`: {f['text']}" for n, fs in found.items() for f in fs]
    return lines + [""]


def render_report(title: str, figures: dict[str, Any], out_dir: Path) -> str:
    """Write the PNGs into ``out_dir``; return the Markdown text (image links relative to it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = StatSettings(**figures["settings"])
    lines = (
        header_section(title, s)
        + data_section(figures["data"])
        + accuracy_section(figures["accuracy"], s, out_dir)
        + heldout_section(figures["heldout"], s)
        + distance_section(figures["distance"], s)
        + predictor_section(figures["predictors"])
        + curves_section(figures["curves"], out_dir)
        + findings_section(figures["findings"], s)
    )
    return "\n".join(lines)
