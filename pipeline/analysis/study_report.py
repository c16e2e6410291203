"""A multi-seed study's report (``python -m pipeline.flows study``): per variant mean ± sd across seeds and
the pooled intervals and tests, the claims it judges (:func:`pipeline.analysis.study.study_claims`, and the
scenario ordering of :mod:`pipeline.analysis.scenario_study` where it ran scenarios), the scenarios' pairs and
accuracy per seed, and the per-seed figures, as markdown and as ``summary.json``."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, cast

import numpy as np

from pipeline.analysis import scenario_study, stats
from pipeline.analysis.findings import StatSettings, json_safe, verdict
from pipeline.analysis.scenarios import SCENARIO_LABELS
from pipeline.analysis.study import StudyRun, per_seed_rows, pooled_accuracy, pooled_pairs, study_claims


def _spread(values: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    return {
        "mean": float(a.mean()) if a.size else float("nan"),
        "sd": float(a.std(ddof=1)) if a.size > 1 else float("nan"),
        "n": int(a.size),
    }


def _fmt_spread(x: dict[str, float], nd: int = 2, scale: float = 1.0, signed: bool = True) -> str:
    if not np.isfinite(x["mean"]):
        return "n/a"
    sd = f" ± {scale * x['sd']:.{nd}f}" if np.isfinite(x["sd"]) else ""
    return f"{scale * x['mean']:{'+' if signed else ''}.{nd}f}{sd}"


def study_summary(runs: list[StudyRun], s: StatSettings) -> list[dict[str, Any]]:
    """Per scenario and variant: mean ± sd across seeds and the pooled intervals and tests."""
    rows = []
    for scenario in sorted({r.scenario for r in runs}):
        for variant in sorted({r.variant for r in runs}):
            rs = [r for r in runs if r.scenario == scenario and r.variant == variant]
            if not rs:
                continue
            seeds = per_seed_rows(rs)
            p = pooled_pairs(rs)
            d_w, d_l = p["d_w"].to_numpy(), p["d_l"].to_numpy()
            below_share, below = stats.sign_test(d_w, level=s.level)
            acc = pooled_accuracy(rs)
            rows.append(
                {
                    "scenario": scenario,
                    "variant": variant,
                    "seeds": sorted(r.seed for r in rs),
                    "pairs": p.height,
                    "prompts": len(acc),
                    "delta_w_seeds": _spread([r["delta_w"] for r in seeds]),
                    "delta_l_seeds": _spread([r["delta_l"] for r in seeds]),
                    "accuracy_seeds": _spread([r["accuracy"] for r in seeds]),
                    "accuracy_before": cast(float, rs[0].before["correct"].mean()),  # a Boolean column: a float
                    "delta_w": s.boot(d_w),
                    "delta_l": s.boot(d_l),
                    "below": below_share,
                    "below_test": below,
                    "wilcoxon_w": stats.wilcoxon_test(d_w),
                    "wilcoxon_l": stats.wilcoxon_test(d_l),
                    "accuracy_change": s.boot(acc),
                    "accuracy_test": stats.wilcoxon_test(acc),
                }
            )
    return rows


def plain(obj: Any) -> Any:
    """``obj`` with its intervals and tests (dataclass instances, at any depth) as dicts, for JSON
    (is_dataclass is also true of a class)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def scenario_section(runs: list[StudyRun], s: StatSettings) -> tuple[list[str], dict[str, Any]]:
    """The scenarios' pairs (counts, on-policy measures) and test accuracy per seed (McNemar) as markdown, and
    their figures for ``summary.json`` (``scenarios``); nothing for a study without scenarios."""
    pair_sets = scenario_study.pair_set_rows(runs, s)
    if not pair_sets:
        return [], {}
    mcnemar = scenario_study.mcnemar_rows(runs, s)
    held = {r["heldout_prompts"] for r in pair_sets}
    shared = f"{held.pop()} held-out prompts" if len(held) == 1 and None not in held else "held-out prompts"
    lines = [
        "## Scenarios",
        "",
        f"The scenarios share the {shared} (held out by a seeded hash of the prompt id, `pairs.seed`) and the "
        "test prompts; a scenario has a held-out pair only where it made one of that prompt. How on-policy each "
        "side is: its mean per-token log-prob under the starting policy over the scenario's pairs, with a "
        f"{100 * s.level:.0f} % bootstrap interval. The ordering of claim 3 is judged in the claims above: per "
        "other scenario, the per-prompt difference of pooled Δlp_w on the prompts with a pair in both, a "
        "Bonferroni-level paired bootstrap interval and the Wilcoxon signed-rank test, Holm-adjusted.",
        "",
        "| pairs | chosen / rejected | experiments | held-out prompts with a pair | held-out pairs | training pairs "
        "| chosen: log-prob per token | rejected: log-prob per token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in pair_sets:
        with_pair = r.get("heldout_prompts_with_pair")
        of = f" of {r['heldout_prompts']}" if r["heldout_prompts"] is not None else ""
        lines.append(
            f"| {r['scenario']} | {SCENARIO_LABELS.get(scenario_study.scenario_number(r['scenario']) or 0, '?')} | "
            f"{len(r['experiments'])} | {'n/a' if with_pair is None else f'{with_pair}{of}'} | "
            f"{r.get('heldout_pairs', 'n/a')} | {r.get('train_pairs', 'n/a')} | "
            f"{r['chosen_per_token'].fmt(3) if 'chosen_per_token' in r else 'n/a'} | "
            f"{r['rejected_per_token'].fmt(3) if 'rejected_per_token' in r else 'n/a'} |"
        )
    lines += [
        "",
        "Test accuracy per seed against the starting policy on the same prompts: the exact McNemar test, its "
        "p-value Holm-adjusted over the seeds of a scenario and variant (the pooled test over seeds is the "
        "per-variant table's Wilcoxon). A seed rejects where the adjusted p is below α and the interval of the "
        "change excludes zero.",
        "",
        "| pairs | variant | seed | accuracy change (pts) | right only before / after | McNemar | Holm-adjusted p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in mcnemar:
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {r['seed']} | {r['change'].fmt(1, 100)} | "
            f"{r['only_before']} / {r['only_after']} | {verdict(r['test'], s)} | {stats.fmt_p(r['p_holm'])}"
            f"{' (rejects)' if r['rejects'] else ''} |"
        )
    lines += [""]
    for sc in scenario_study.scenario_sets(runs):
        for variant in sorted({r["variant"] for r in mcnemar}):
            mine = [r for r in mcnemar if r["scenario"] == sc and r["variant"] == variant]
            if mine:
                lines.append(
                    f"- {sc}, {variant}: McNemar rejects after Holm in {sum(r['rejects'] for r in mine)} of "
                    f"{len(mine)} seeds."
                )
    lines += [""]
    return lines, {"scenarios": {"pair_sets": plain(pair_sets), "mcnemar": plain(mcnemar)}}


def study_report(
    runs: list[StudyRun],
    roles: dict[str, str],
    s: StatSettings,
    title: str,
    command: str,
    sections: list[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Markdown and every figure behind it (``summary.json``) of a study's runs; ``sections``: markdown lines
    put before the claims (the tuning mode's grid and comparison)."""
    seeds = per_seed_rows(runs)
    summary = study_summary(runs, s)
    ordering = scenario_study.ordering_claims(runs, roles["dpo"], s) if "dpo" in roles else []
    claim_objs = study_claims(runs, roles, s) + ordering
    claims = [c.row(s) for c in claim_objs]
    lines = [
        f"# {title}",
        "",
        f"`{command}`: {len({r.seed for r in runs})} training seeds × {len({r.variant for r in runs})} "
        f"variants × {len({r.scenario for r in runs})} pair set(s), one DVC experiment per seed and pair set. "
        f"Across seeds: mean ± sd of the per-seed figures. Pooled: each held-out pair's change averaged over "
        f"the seeds, {100 * s.level:.0f} % paired bootstrap intervals ({s.n_resamples} resamples, seed {s.seed}) "
        f"and the sign test / Wilcoxon signed-rank test; accuracy: each test prompt's share of correct answers "
        f"over the seeds minus its correctness before training, bootstrap interval and Wilcoxon test. "
        f"A claim is *reproduced* where its test rejects at α = {s.alpha:g} and the interval excludes zero the "
        f"claimed way, *contradicted* where both hold the other way, else *not significant*.",
        "",
        *(sections or []),
        "## Claims (docs/losses.md)",
        "",
        "| claim | source | pairs | measure | estimate and interval | test | seeds agreeing | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, row in zip(claim_objs, claims):
        lines.append(
            f"| {c.claim} | {c.source} | {c.scenario} | {c.measure} | {c.interval.fmt()} | "
            f"{verdict(c.test, s)} | {c.seeds_agree} | **{row['verdict']}** |"
        )
    if not claim_objs:
        lines.append("| (no variant trains with the dpo or dpop loss) | | | | | | | |")
    lines += [
        "",
        "Not judged here (one training run per seed cannot show them; see each run's `reports/main`): "
        "the 3D-properties' drastic drop, degradation and dispersion (claim 2), "
        + ("" if ordering else "the scenario ordering (claim 3, needs scenario 1 and another scenario), ")
        + "regularisers (claim 4), squeezing (claim 5), γ (claim 6).",
        "",
    ]
    scenario_lines, scenario_record = scenario_section(runs, s)
    lines += [
        *scenario_lines,
        "## Per variant",
        "",
        "| pairs | variant | seeds | held-out pairs | Δlp_w across seeds | Δlp_w pooled | below ref (sign test) "
        "| Δlp_l across seeds | Δlp_l pooled | accuracy before | accuracy across seeds (%) "
        "| accuracy change pooled (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {', '.join(map(str, r['seeds']))} | {r['pairs']} | "
            f"{_fmt_spread(r['delta_w_seeds'])} | {r['delta_w'].fmt()} | {r['below'].fmt_share()}, "
            f"{verdict(r['below_test'], s)} | {_fmt_spread(r['delta_l_seeds'])} | {r['delta_l'].fmt()} | "
            f"{100 * r['accuracy_before']:.1f} | {_fmt_spread(r['accuracy_seeds'], 1, 100, signed=False)} | "
            f"{r['accuracy_change'].fmt(1, 100)}, {verdict(r['accuracy_test'], s)} |"
        )
    lines += [
        "",
        "## Per seed",
        "",
        "| pairs | variant | seed | experiment | held-out pairs | mean Δlp_w | mean Δlp_l | accuracy (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in seeds:
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {r['seed']} | {r['experiment']} | {r['pairs']} | "
            f"{r['delta_w']:+.2f} | {r['delta_l']:+.2f} | {100 * r['accuracy']:.1f} |"
        )
    record = {"settings": asdict(s), "per_seed": seeds, "summary": plain(summary), "claims": claims, **scenario_record}
    return "\n".join(lines) + "\n", json_safe(record)
