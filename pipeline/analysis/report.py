"""The Markdown report that puts the training variants side by side, with PNG plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

from pipeline.data import tagging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A pair whose summed log-prob moved by less than this (nats) is treated as unchanged in the words.
DISPLACEMENT_TOL = 0.05


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
            if key in hist:
                steps, vals = zip(*hist[key])
                ax.plot(steps, vals, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(values: dict[str, float], path: Path, title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(values), 3.4))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _early_late(series: list[tuple[int, float]]) -> tuple[float, float]:
    vals = [v for _, v in series]
    q = max(1, len(vals) // 4)
    early, late = vals[:q], vals[len(vals) // 2:]
    return sum(early) / len(early), sum(late) / len(late)


def _smooth(vals: list[float], k: int = 3) -> list[float]:
    return [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]


def findings(name: str, ev: dict, hist: dict) -> list[str]:
    """Plain-words statements of what the figures show for one variant."""
    h = ev["heldout"]
    out = []
    if h.get("n_pairs"):
        dw, dl = h["delta_w"], h["delta_l"]
        if dw < -DISPLACEMENT_TOL:
            out.append(f"**likelihood displacement**: mean held-out lp_w fell by {-dw:.2f} nats "
                       f"({100 * h['displaced_share']:.0f}% of pairs below the reference) while the margin "
                       f"{'grew' if dw - dl > 0 else 'did not grow'} (Δlp_l = {dl:+.2f}).")
        elif dw > DISPLACEMENT_TOL:
            out.append(f"lp_w stayed above the reference: mean held-out lp_w rose by {dw:.2f} nats "
                       f"({100 * h['displaced_share']:.0f}% of pairs below the reference).")
        else:
            out.append(f"lp_w is unchanged within {DISPLACEMENT_TOL} nats (Δ = {dw:+.3f}).")
    if "log10_grad_ratio" in hist and len(hist["log10_grad_ratio"]) >= 4:
        r0, r1 = _early_late(hist["log10_grad_ratio"])
        if r1 - r0 >= 1.0:
            out.append(f"**drastic drop** (3D-properties): measured against the probabilities, the gradient on the "
                       f"rejected side went from 10^{r0:.1f} to 10^{r1:.1f} times the chosen side's (batch median; "
                       f"mean of the first quarter vs the second half of training) as π(y_l) fell.")
    if "probe_greedy_lp" in hist and len(hist["probe_greedy_lp"]) >= 2 and h.get("n_pairs"):
        p0, p1 = hist["probe_greedy_lp"][0][1], hist["probe_greedy_lp"][-1][1]
        if p1 - p0 > DISPLACEMENT_TOL and h["delta_w"] < 0 and h["delta_l"] < 0:
            out.append(f"**squeezing**: the log-prob of the probe prompts' greedy decode rose {p0:.2f} → {p1:.2f} "
                       f"while held-out chosen and rejected both fell.")
    if "delta_w" in hist and len(hist["delta_w"]) >= 6:
        vals = _smooth([v for _, v in hist["delta_w"]])
        peak = max(range(len(vals)), key=vals.__getitem__)
        if 0 < peak < len(vals) - 1 and vals[peak] > 0 and vals[peak] - vals[-1] > DISPLACEMENT_TOL:
            out.append(f"**degradation**: the chosen log-ratio to the reference (lp_w − ref_w, training batches, "
                       f"3-step moving mean) rose to {vals[peak]:+.2f} at step {peak} and then fell to {vals[-1]:+.2f}.")
    return out


def build_report(title: str, policy: dict, evals: dict[str, dict], histories: dict[str, dict],
                 pipeline_metrics: dict[str, dict], out_dir: Path) -> str:
    """Write PNGs into ``out_dir`` and return the Markdown text (image links relative to it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(evals)
    lines = [f"# {title}", ""]

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

    lines += ["## Accuracy (greedy, test prompts)", "",
              "| model | accuracy |", "|---|---|",
              f"| starting policy | {_f(100 * policy['test_accuracy'], 1)}% |"]
    lines += [f"| {n} | {_f(100 * evals[n]['test_accuracy'], 1)}% |" for n in names]
    plot_bars({"start": 100 * policy["test_accuracy"], **{n: 100 * evals[n]["test_accuracy"] for n in names}},
              out_dir / "accuracy.png", "greedy test accuracy", "%")
    lines += ["", "![accuracy](accuracy.png)", ""]

    lines += ["## Log-probabilities of held-out pairs before and after training (cf. the 3D-properties paper, Table 1)", "",
              "Mean summed log-probs (per-token in brackets); *before* is the reference (the starting policy).", "",
              "| variant | pairs | chosen before | chosen after | rejected before | rejected after | Δ chosen | "
              "Δ rejected | lp_w < ref_w | pair acc. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        h = evals[n]["heldout"]
        if not h.get("n_pairs"):
            lines.append(f"| {n} | 0 | | | | | | | | |")
            continue
        lines.append(
            f"| {n} | {h['n_pairs']} | {_f(h['ref_w'])} ({_f(h['ref_w_per_token'], 3)}) | {_f(h['lp_w'])} "
            f"({_f(h['lp_w_per_token'], 3)}) | {_f(h['ref_l'])} ({_f(h['ref_l_per_token'], 3)}) | {_f(h['lp_l'])} "
            f"({_f(h['lp_l_per_token'], 3)}) | {h['delta_w']:+.2f} | {h['delta_l']:+.2f} | "
            f"{_f(100 * h['displaced_share'], 0)}% | {_f(100 * h['pair_accuracy'], 0)}% |")
    lines += ["", "### Change of lp_w by normalised edit distance (held-out pairs)", ""]
    buckets = sorted({b for n in names for b in evals[n]["heldout"].get("by_distance", {})})
    if buckets:
        lines += ["| variant | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        for n in names:
            bd = evals[n]["heldout"].get("by_distance", {})
            cells = [f"{bd[b]['delta_w']:+.2f} (n={bd[b]['n']})" if bd.get(b, {}).get("n") else "–" for b in buckets]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")

    if histories:
        plot_curves(histories, ["lp_w", "lp_l", "delta_margin"], out_dir / "logprobs.png",
                    "training batches: summed log-probs and the margin Δw − Δl (unscaled)")
        plot_curves(histories, ["delta_w", "delta_l", "displaced_share"], out_dir / "displacement.png",
                    "log-ratio to the reference and share of pairs with lp_w < ref_w")
        plot_curves(histories, ["loss", "accuracy"], out_dir / "loss.png", "loss and pair accuracy")
        plot_curves(histories, ["log10_grad_prob_w", "log10_grad_prob_l", "log10_grad_ratio"], out_dir / "gradients.png",
                    "log10 |∂L/∂π(y)|: chosen, rejected, and their ratio (rejected / chosen)")
        plot_curves(histories, ["probe_greedy_lp", "delta_w", "delta_l"], out_dir / "squeezing.png",
                    "greedy decode of probe prompts vs chosen/rejected log-ratio")
        lines += ["## Training curves", "", "![log-probs](logprobs.png)", "", "![displacement](displacement.png)", "",
                  "![loss](loss.png)", "",
                  "## 3D-properties and squeezing", "",
                  "Gradient magnitudes measured against the probabilities (REFERENCE claim 2a; for DPO the ratio is "
                  "π(y_w)/π(y_l)), and the log-prob of the greedy decode of fixed probe prompts (claim 5).", "",
                  "![gradients](gradients.png)", "", "![squeezing](squeezing.png)", ""]
        bucket_keys = sorted({k for hh in histories.values() for k in hh if k.startswith("displaced_share_")})
        if bucket_keys:
            lines += ["Share of training-batch pairs with lp_w < ref_w by normalised edit distance (mean over steps):", "",
                      "| variant | " + " | ".join(k.removeprefix("displaced_share_") for k in bucket_keys) + " |",
                      "|---|" + "---|" * len(bucket_keys)]
            for n, hh in histories.items():
                cells = [f"{100 * sum(v for _, v in hh[k]) / len(hh[k]):.0f}% ({len(hh[k])} steps)" if hh.get(k) else "–"
                         for k in bucket_keys]
                lines.append(f"| {n} | " + " | ".join(cells) + " |")
            lines.append("")

    lines += ["## Findings", ""]
    for n in names:
        for f in findings(n, evals[n], histories.get(n, {})) or ["no notable effect in these figures."]:
            lines.append(f"- `{n}`: {f}")
    lines.append("")
    return "\n".join(lines)


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
