"""A multi-seed study's report (``python -m pipeline.flows study``): per variant mean ± sd across seeds and
the pooled intervals and tests, the claims it judges (:func:`pipeline.analysis.study.study_claims`) and the
per-seed figures, as markdown and as ``summary.json``."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, cast

import numpy as np

from pipeline.analysis import stats
from pipeline.analysis.findings import StatSettings, json_safe, verdict
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


def study_report(
    runs: list[StudyRun], roles: dict[str, str], s: StatSettings, title: str, command: str
) -> tuple[str, dict[str, Any]]:
    """Markdown and every figure behind it (``summary.json``) of a study's runs."""
    seeds = per_seed_rows(runs)
    summary = study_summary(runs, s)
    claim_objs = study_claims(runs, roles, s)
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
        "the 3D-properties' drastic drop, degradation and dispersion (claim 2), the scenario ordering "
        "(claim 3, needs several pair sets), regularisers (claim 4), squeezing (claim 5), γ (claim 6).",
        "",
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
    # the tests' and intervals' dataclass instances as dicts (is_dataclass is also true of a class)
    plain = [
        {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in r.items()} for r in summary
    ]
    record = {"settings": asdict(s), "per_seed": seeds, "summary": plain, "claims": claims}
    return "\n".join(lines) + "\n", json_safe(record)
