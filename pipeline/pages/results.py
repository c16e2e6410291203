"""``docs/results.md``: the default run's findings, the multi-seed study's, the scenario study's and the tuned
comparison's, read from their JSON.

The default run is read from ``reports/findings.json``, the report stage's findings
(:func:`pipeline.analysis.report.findings_record`), which git tracks so that the page can be checked on a
fresh clone where DVC's other outputs are absent. The study is read from
``reports/study/summary.json`` (:func:`pipeline.analysis.study_report.study_report`), the scenario study and the
tuned comparison from theirs (:mod:`pipeline.pages.studies`). Every figure carries its
interval and its test, printed as the report prints them; a missing file makes its section say that it
has not been run yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.analysis.findings import StatSettings
from pipeline.pages.markdown import NA, count, interval, settings, table, tested
from pipeline.pages.studies import SCENARIOS_JSON, TUNING_JSON, scenarios_section, tuning_section
from pipeline.pages.study_tables import claims_table, load, per_seed_table, rule, study_variants_table

PAGE = "docs/results.md"
REPORT_JSON = "reports/findings.json"
STUDY_JSON = "reports/study/summary.json"


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
    lines += [f"`{REPORT_JSON}` (the report stage's findings; `reports/main/report.md` has the plots). {rule(s)}", ""]
    lines += accuracy_section(variants, s) + heldout_section(variants, s) + between_section(record, s)
    lines += distance_section(record, s) + predictor_section(record, s) + findings_section(variants)
    return lines


# --------------------------------------------------------------------------------------------- study
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
        f"seeds. {rule(s)} A claim is *reproduced* where its test rejects and the interval excludes zero "
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
        f"Generated by `python -m pipeline.pages` from `{REPORT_JSON}`, `{STUDY_JSON}`, `{SCENARIOS_JSON}` and "
        f"`{TUNING_JSON}`; do not edit it by hand (`python -m pipeline.pages --check` fails when it differs from "
        "them). What each figure measures: [diagnostics and report](diagnostics-and-report.md).",
        "",
    ]
    lines += default_run_section(load(root / REPORT_JSON))
    lines += study_section(load(root / STUDY_JSON))
    lines += scenarios_section(load(root / SCENARIOS_JSON))
    lines += tuning_section(load(root / TUNING_JSON))
    return "\n".join(lines)
