"""``docs/results.md``: the default run's findings and the multi-seed study's, read from their JSON.

The default run is read from ``reports/findings.json``, the report stage's findings
(:func:`pipeline.analysis.report.findings_record`), which git tracks so that the page can be checked on a
fresh clone where DVC's other outputs are absent. The study is read from
``reports/study/summary.json`` (:func:`pipeline.analysis.study_report.study_report`). Every figure carries its
interval and its test, printed as the report prints them; a missing file makes its section say that it
has not been run yet.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.analysis.findings import StatSettings
from pipeline.pages.markdown import NA, count, fixed, interval, settings, table, tested

PAGE = "docs/results.md"
REPORT_JSON = "reports/findings.json"
STUDY_JSON = "reports/study/summary.json"


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _rule(s: StatSettings | None) -> str:
    if s is None:
        return "The file records no statistical settings."
    return (
        f"{100 * s.level:.0f} % intervals (paired bootstrap over pairs or prompts, {s.n_resamples} resamples, "
        f"seed {s.seed}; Wilson for accuracies), α = {s.alpha:g}."
    )


def _findings_of(variant: Mapping, kind: str) -> Mapping:
    for f in variant.get("findings") or []:
        if isinstance(f, Mapping) and f.get("kind") == kind:
            return f
    return {}


# --------------------------------------------------------------------------------------------- default run
def accuracy_section(variants: Mapping, s: StatSettings | None) -> list[str]:
    rows, start = [], None
    for name, v in variants.items():
        fig = _findings_of(v, "accuracy").get("figures") or {}
        start = start or fig.get("accuracy_before")
        rows.append(
            [
                f"`{name}`",
                interval(fig.get("accuracy")).fmt_share(1),
                interval(fig.get("difference")).fmt(1, 100, " pts"),
                f"{count(fig.get('only_before'))} / {count(fig.get('only_after'))}",
                tested(fig.get("mcnemar"), s),
            ]
        )
    head = [["starting policy", interval(start).fmt_share(1), "", "", ""]] if start else []
    return [
        "### Greedy test accuracy",
        "",
        "Accuracy with its Wilson interval; the change against the starting policy on the same prompts with "
        "its paired bootstrap interval, the prompts right only before / only after, and the exact McNemar test.",
        "",
        *table(["model", "accuracy", "change vs start", "right only before / after", "McNemar"], head + rows),
        "",
    ]


def heldout_section(variants: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for name, v in variants.items():
        h = v.get("heldout") or {}
        rows.append(
            [
                f"`{name}`",
                count(h.get("n")),
                interval(h.get("delta_w")).fmt(),
                interval(h.get("delta_w_median")).fmt(),
                interval(h.get("delta_l")).fmt(),
                interval(h.get("delta_l_median")).fmt(),
                interval(h.get("below")).fmt_share(),
                tested(h.get("below_test"), s),
            ]
        )
    return [
        "### Held-out pairs",
        "",
        "Per pair, Δ = log-prob after training − under the reference (the starting policy), summed over the "
        "response's tokens, in nats: mean and median with paired bootstrap intervals; the share of pairs with "
        "lp_w < ref_w with its Wilson interval and the sign test of one half.",
        "",
        *table(
            ["variant", "pairs", "Δ chosen: mean", "median", "Δ rejected: mean", "median", "lp_w < ref_w", "sign test"],
            rows,
        ),
        "",
    ]


def between_section(record: Mapping, s: StatSettings | None) -> list[str]:
    lines = []
    for b in record.get("between") or []:
        lines.append(
            f"- Δ chosen, `{b.get('b')}` − `{b.get('a')}` on the same pairs: "
            f"{interval(b.get('delta_w_difference')).fmt()} nats (paired bootstrap), "
            f"{tested(b.get('wilcoxon'), s)}."
        )
    for b in record.get("accuracy_between") or []:
        fig = (b.get("finding") or {}).get("figures") or {}
        lines.append(
            f"- Test accuracy, `{b.get('b')}` − `{b.get('a')}` on the same prompts: "
            f"{interval(fig.get('difference')).fmt(1, 100, ' pts')} (paired bootstrap), "
            f"{tested(fig.get('mcnemar'), s)}."
        )
    return ["### Variants against each other", "", *lines, ""] if lines else []


def distance_section(record: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for name, v in (record.get("variants") or {}).items():
        h = v.get("heldout") or {}
        rows.append(
            [f"`{name}`", "held-out", count(h.get("n")), interval(h.get("slope")).fmt(), tested(h.get("slope_test"), s)]
        )
    for name, t in (record.get("trained_pairs_slope") or {}).items():
        rows.append(
            [
                f"`{name}`",
                "trained (fixed training subset)",
                count(t.get("n")),
                interval(t.get("slope")).fmt(),
                tested(t.get("test"), s),
            ]
        )
    return [
        "### Δ chosen against edit distance",
        "",
        "Least-squares slope of each pair's Δ chosen on its normalised edit distance, with its t interval "
        "(nats per unit of distance). Claim 1 of [the losses page](losses.md#claims) expects a positive slope "
        "on the trained pairs; held-out rejected responses were never trained on.",
        "",
        *table(["variant", "pairs", "n", "slope", "test"], rows),
        "",
    ]


def predictor_section(record: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for name, p in (record.get("predictors") or {}).items():
        cells = [
            f"{interval(p.get(c, {}).get('rho')).fmt()} ({tested(p.get(c, {}).get('test'), s)})"
            for c in ("edit_distance_norm", "ches", "ches_norm")
        ]
        rows.append([f"`{name}`", *cells, interval(p.get("gap_ches_norm_minus_edit_distance")).fmt()])
    if not rows:
        return []
    return [
        "### Edit distance or CHES: which ranks the fall of lp_w",
        "",
        "Spearman's ρ between each held-out pair's Δ chosen and each predictor (paired bootstrap interval, test "
        "of ρ = 0), and |ρ(CHES_norm)| − |ρ(edit distance)|: above zero, CHES ranks the pairs better.",
        "",
        *table(["variant", "ρ, edit distance", "ρ, CHES", "ρ, CHES_norm", "gap"], rows),
        "",
    ]


def findings_section(variants: Mapping) -> list[str]:
    lines = [
        f"- `{name}`: {f.get('text', NA)}"
        for name, v in variants.items()
        for f in v.get("findings") or []
        if isinstance(f, Mapping)
    ]
    return [
        "### Findings",
        "",
        "Each written by its test ([the rules](diagnostics-and-report.md#the-reports-tests)); a word in bold "
        "only where the test rejects.",
        "",
        *lines,
        "",
    ]


def default_run_section(record: dict | None) -> list[str]:
    lines = ["## The default run", ""]
    if record is None:
        return lines + [
            f"Not yet run: `{REPORT_JSON}` is absent. `make repro` runs the pipeline; the report "
            "stage writes it and `python -m pipeline.pages` fills this section.",
            "",
        ]
    s = settings(record.get("settings"))
    variants = {k: v for k, v in sorted((record.get("variants") or {}).items()) if isinstance(v, Mapping)}
    lines += [f"`{REPORT_JSON}` (the report stage's findings; `reports/main/report.md` has the plots). {_rule(s)}", ""]
    lines += accuracy_section(variants, s) + heldout_section(variants, s) + between_section(record, s)
    lines += distance_section(record, s) + predictor_section(record, s) + findings_section(variants)
    return lines


# --------------------------------------------------------------------------------------------- study
def _spread(x: Any, nd: int = 2, scale: float = 1.0, signed: bool = True) -> str:
    """``mean ± sd`` across seeds."""
    x = x if isinstance(x, Mapping) else {}
    mean, sd = fixed(x.get("mean"), nd, scale, signed), fixed(x.get("sd"), nd, scale)
    return mean if sd == NA else f"{mean} ± {sd}"


def claims_table(summary: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for c in summary.get("claims") or []:
        iv = interval({"estimate": c.get("estimate"), "low": c.get("low"), "high": c.get("high")})
        test = {"name": c.get("test"), "p_value": c.get("p_value"), "n": c.get("n")}
        rows.append(
            [
                str(c.get("claim", NA)),
                f"[{c.get('source', NA)}](losses.md#claims)",
                str(c.get("scenario", NA)),
                str(c.get("measure", NA)),
                iv.fmt(),
                tested(test, s),
                str(c.get("seeds", NA)),
                f"**{c.get('verdict', NA)}**",
            ]
        )
    return table(
        ["claim", "source", "pairs", "measure", "estimate and interval", "test", "seeds agreeing", "verdict"], rows
    )


def study_variants_table(summary: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for r in summary.get("summary") or []:
        rows.append(
            [
                str(r.get("scenario", NA)),
                f"`{r.get('variant', NA)}`",
                ", ".join(map(str, r.get("seeds") or [])),
                count(r.get("pairs")),
                _spread(r.get("delta_w_seeds")),
                interval(r.get("delta_w")).fmt(),
                f"{interval(r.get('below')).fmt_share()}, {tested(r.get('below_test'), s)}",
                _spread(r.get("delta_l_seeds")),
                interval(r.get("delta_l")).fmt(),
                fixed(r.get("accuracy_before"), 1, 100),
                _spread(r.get("accuracy_seeds"), 1, 100, signed=False),
                f"{interval(r.get('accuracy_change')).fmt(1, 100)}, {tested(r.get('accuracy_test'), s)}",
            ]
        )
    return table(
        [
            "pairs",
            "variant",
            "seeds",
            "held-out pairs",
            "Δlp_w across seeds",
            "Δlp_w pooled",
            "below ref (sign test)",
            "Δlp_l across seeds",
            "Δlp_l pooled",
            "accuracy before (%)",
            "accuracy across seeds (%)",
            "accuracy change pooled (pts)",
        ],
        rows,
    )


def per_seed_table(summary: Mapping) -> list[str]:
    rows = [
        [
            str(r.get("scenario", NA)),
            f"`{r.get('variant', NA)}`",
            count(r.get("seed")),
            f"`{r.get('experiment', NA)}`",
            count(r.get("pairs")),
            fixed(r.get("delta_w"), 2, signed=True),
            fixed(r.get("delta_l"), 2, signed=True),
            fixed(r.get("accuracy"), 1, 100),
        ]
        for r in summary.get("per_seed") or []
    ]
    return table(
        ["pairs", "variant", "seed", "experiment", "held-out pairs", "mean Δlp_w", "mean Δlp_l", "accuracy (%)"], rows
    )


def study_section(summary: dict | None) -> list[str]:
    lines = ["## The multi-seed study", ""]
    if summary is None:
        return lines + [
            f"Not yet run: `{STUDY_JSON}` is absent. `python -m pipeline.flows study` writes it "
            "([the study flow](diagnostics-and-report.md#several-seeds-the-study-flow)).",
            "",
        ]
    s = settings(summary.get("settings"))
    lines += [
        f"`{STUDY_JSON}`, written by `{summary.get('command', 'python -m pipeline.flows study')}`. Across "
        "seeds: mean ± sd of the per-seed figures. Pooled: each held-out pair's change averaged over the "
        f"seeds. {_rule(s)} A claim is *reproduced* where its test rejects and the interval excludes zero "
        "the claimed way, *contradicted* where both hold the other way, else *not significant*.",
        "",
    ]
    failed = summary.get("failed") or []
    if failed:
        lines += ["Failed experiments: " + ", ".join(f"`{f}`" for f in failed) + ".", ""]
    lines += [
        "### Claims",
        "",
        *claims_table(summary, s),
        "",
        "### Per variant",
        "",
        *study_variants_table(summary, s),
        "",
        "### Per seed",
        "",
        *per_seed_table(summary),
        "",
    ]
    return lines


def results_page(root: Path) -> str:
    lines = [
        "# Results",
        "",
        f"Generated by `python -m pipeline.pages` from `{REPORT_JSON}` and `{STUDY_JSON}`; do not edit it "
        "by hand (`python -m pipeline.pages --check` fails when it differs from them). What each figure "
        "measures: [diagnostics and report](diagnostics-and-report.md).",
        "",
    ]
    lines += default_run_section(_load(root / REPORT_JSON))
    lines += study_section(_load(root / STUDY_JSON))
    return "\n".join(lines)
