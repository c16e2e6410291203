"""The scenario study's and the tuned comparison's sections of ``docs/results.md``, read from their
``summary.json`` (``reports/scenarios/``: ``python -m pipeline.flows study --scenarios ...``; ``reports/tuning/``:
``python -m pipeline.flows study --tune``). Every figure with its interval and test, printed as their reports print
them; a missing file makes its section say how to run it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.analysis.findings import StatSettings
from pipeline.analysis.scenarios import SCENARIO_LABELS
from pipeline.pages.markdown import NA, count, fixed, interval, settings, table, tested
from pipeline.pages.study_tables import claims_table, rule, study_variants_table

SCENARIOS_JSON = "reports/scenarios/summary.json"
TUNING_JSON = "reports/tuning/summary.json"
HOW = "diagnostics-and-report.md#the-scenario-study-and-the-tuning-mode"


def _intro(path: str, summary: Mapping, s: StatSettings | None) -> list[str]:
    run: Mapping = summary.get("run") or {}
    seconds: Mapping = run.get("seconds") or {} if isinstance(run, Mapping) else {}
    took = (
        f" Its experiments took {', '.join(f'{k} {fixed(v, 0, 1 / 60)} min' for k, v in seconds.items())} "
        f"({count(run.get('cpus'))} CPUs)."
        if seconds
        else ""
    )
    lines = [
        f"`{path}`, written by `{summary.get('command', NA)}`.{took} {rule(s)} A claim is *reproduced* where its "
        "test rejects and the interval excludes zero the claimed way, *contradicted* where both hold the other "
        "way, else *not significant*.",
        "",
    ]
    failed = summary.get("failed") or []
    return lines + (["Failed experiments: " + ", ".join(f"`{f}`" for f in failed) + ".", ""] if failed else [])


def _label(pair_set: Any) -> str:
    k = str(pair_set).split()[-1]
    return SCENARIO_LABELS.get(int(k), NA) if k.isdigit() else NA


def pair_sets_table(scenarios: Mapping) -> list[str]:
    rows = []
    for r in scenarios.get("pair_sets") or []:
        with_pair, held = r.get("heldout_prompts_with_pair"), r.get("heldout_prompts")
        rows.append(
            [
                str(r.get("scenario", NA)),
                _label(r.get("scenario")),
                count(len(r.get("experiments") or [])),
                f"{count(with_pair)} of {count(held)}",
                count(r.get("heldout_pairs")),
                count(r.get("train_pairs")),
                interval(r.get("chosen_per_token")).fmt(3),
                interval(r.get("rejected_per_token")).fmt(3),
            ]
        )
    return table(
        [
            "pairs",
            "chosen / rejected",
            "experiments",
            "held-out prompts with a pair",
            "held-out pairs",
            "training pairs",
            "chosen: log-prob per token",
            "rejected: log-prob per token",
        ],
        rows,
    )


def mcnemar_table(scenarios: Mapping, s: StatSettings | None) -> list[str]:
    rows = [
        [
            str(r.get("scenario", NA)),
            f"`{r.get('variant', NA)}`",
            count(r.get("seed")),
            interval(r.get("change")).fmt(1, 100),
            f"{count(r.get('only_before'))} / {count(r.get('only_after'))}",
            tested(r.get("test"), s),
            fixed(r.get("p_holm"), 3) + (" (rejects)" if r.get("rejects") else ""),
        ]
        for r in scenarios.get("mcnemar") or []
    ]
    return table(
        ["pairs", "variant", "seed", "accuracy change (pts)", "right only before / after", "McNemar", "Holm p"], rows
    )


def scenarios_section(summary: dict | None) -> list[str]:
    lines = ["## The data scenarios", ""]
    if summary is None:
        return lines + [
            f"Not yet run: `{SCENARIOS_JSON}` is absent; [the scenario study]({HOW}) writes it.",
            "",
        ]
    s = settings(summary.get("settings"))
    scenarios = summary.get("scenarios") or {}
    return lines + [
        *_intro(SCENARIOS_JSON, summary, s),
        "The scenarios share the held-out prompts and the test prompts. Claim 3 (scenario 1 shows the mildest "
        "displacement) is judged per other scenario on the prompts with a pair in both: the difference of pooled "
        "Δlp_w, its Bonferroni-level paired bootstrap interval and the Wilcoxon test, Holm-adjusted; reproduced "
        "only where scenario 1 is significantly higher than every other scenario.",
        "",
        "### Claims",
        "",
        *claims_table(summary, s),
        "",
        "### Pairs per scenario",
        "",
        "How on-policy each side is: its mean per-token log-prob under the starting policy, bootstrap interval.",
        "",
        *pair_sets_table(scenarios),
        "",
        "### Per variant",
        "",
        *study_variants_table(summary, s),
        "",
        "### Test accuracy per seed",
        "",
        "Exact McNemar test against the starting policy on the same prompts, Holm-adjusted over the seeds.",
        "",
        *mcnemar_table(scenarios, s),
        "",
    ]


def _setting(d: Any) -> str:
    d = d if isinstance(d, Mapping) else {}
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()) or NA


def grid_table(tuning: Mapping) -> list[str]:
    rows = [
        [
            f"`{p.get('variant', NA)}`",
            _setting(p.get("setting")),
            f"`{p.get('experiment', NA)}`",
            interval(p.get("val_accuracy")).fmt_share(1) if p.get("status") == "done" else "**failed**",
            "**kept**" if p.get("selected") else "",
        ]
        for p in tuning.get("points") or []
    ]
    return table(["variant", "setting", "experiment", "validation accuracy", "kept"], rows)


def comparison_table(tuning: Mapping, s: StatSettings | None) -> list[str]:
    rows = [
        [
            f"`{c.get('b', NA)}` − `{c.get('a', NA)}`",
            ", ".join(map(str, c.get("seeds") or [])),
            f"{interval(c.get('accuracy_difference')).fmt(1, 100)}, {tested(c.get('accuracy_test'), s)}",
            f"{interval(c.get('delta_w_difference')).fmt()}, {tested(c.get('delta_w_test'), s)}",
            f"{interval(c.get('delta_l_difference')).fmt()}, {tested(c.get('delta_l_test'), s)}",
            f"{sum(bool(r.get('rejects')) for r in c.get('per_seed') or [])} of {len(c.get('per_seed') or [])}",
        ]
        for c in tuning.get("comparisons") or []
    ]
    return table(
        [
            "variants",
            "seeds",
            "test accuracy (pts, per prompt over the seeds)",
            "Δlp_w (nats, per pair)",
            "Δlp_l (nats, per pair)",
            "seeds where McNemar rejects (Holm)",
        ],
        rows,
    )


def tuning_section(summary: dict | None) -> list[str]:
    lines = ["## The tuned comparison", ""]
    if summary is None:
        return lines + [f"Not yet run: `{TUNING_JSON}` is absent; [the tuning mode]({HOW}) writes it.", ""]
    s = settings(summary.get("settings"))
    tuning = summary.get("tuning") or {}
    start = tuning.get("policy_val_accuracy")
    grid = tuning.get("grid") or {}
    return lines + [
        *_intro(TUNING_JSON, summary, s),
        f"Each variant trained once per grid point on train.seed {count(tuning.get('seed'))}, scored on "
        f"{count(tuning.get('n_val'))} validation prompts (neither trained on nor tested; the starting policy "
        f"answers {fixed(start, 1, 100)} % of them). Criterion: {tuning.get('criterion', NA)}. Grid: "
        + "; ".join(
            f"`{v}`: " + ", ".join(f"{k} ∈ {{{', '.join(map(str, vs))}}}" for k, vs in axes.items())
            for v, axes in grid.items()
        )
        + ".",
        "",
        "### Grid and selection",
        "",
        *grid_table(tuning),
        "",
        "### The kept settings compared",
        "",
        "On the same test prompts (each prompt's share correct over the seeds, paired bootstrap, Wilcoxon) and "
        "held-out pairs (pooled over the seeds, paired bootstrap, Wilcoxon).",
        "",
        *comparison_table(tuning, s),
        "",
        "### Claims of the kept settings",
        "",
        *claims_table(summary, s),
        "",
        "### Per variant",
        "",
        *study_variants_table(summary, s),
        "",
    ]
