"""A multi-seed study's statistics (``python -m pipeline.flows study``): per seed, across seeds, pooled.

Each run is one training seed (and scenario) of one variant, read from its DVC experiment: the per-pair
held-out table (``pair_eval``), the per-prompt greedy answers before and after training
(``generations``) and the fixed training subset's last Δ chosen (``fixed_curves``). Three views:

- **per seed**: the run's mean Δlp_w = lp_w − ref_w, Δlp_l and test accuracy;
- **across seeds**: mean ± sd of those per-seed figures (numpy, ``ddof=1``), and in how many seeds
  the mean points the claimed way;
- **pooled**: each pair's Δ averaged over the seeds (the pair is the unit: the seeds share the
  held-out pairs), with a paired bootstrap interval of the mean and the sign test or Wilcoxon
  signed-rank test of :mod:`pipeline.analysis.stats`; accuracy as each prompt's share of correct
  answers over the seeds minus its correctness before training, with a bootstrap interval and the
  Wilcoxon test.

A claim of ``docs/losses.md`` is **reproduced** where its pooled test rejects at α and the
interval excludes zero the claimed way, **contradicted** where both hold the other way, and **not
significant** otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, cast

import numpy as np
import polars as pl

from pipeline.analysis import stats
from pipeline.analysis.findings import StatSettings, json_safe, verdict


@dataclass(frozen=True)
class StudyRun:
    """One trained variant of one experiment of the study."""

    experiment: str
    scenario: str  # "default" (the pairs of params.yaml) or the pairs.scenario
    seed: int
    variant: str
    pairs: pl.DataFrame  # pair_eval
    before: pl.DataFrame  # generations of the starting policy
    after: pl.DataFrame  # generations of the trained variant
    # the fixed training subset after the last scoring: pair_id, d (= lp_w − ref_w), edit_distance_norm
    # (findings.trained_pair_changes); None when training scored no fixed sets
    trained: pl.DataFrame | None = None


def _deltas(t: pl.DataFrame) -> pl.DataFrame:
    return t.select(
        "pair_id",
        "edit_distance_norm",
        (pl.col("lp_w") - pl.col("ref_w")).alias("d_w"),
        (pl.col("lp_l") - pl.col("ref_l")).alias("d_l"),
    )


def per_seed_rows(runs: list[StudyRun]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        d = _deltas(r.pairs)
        rows.append(
            {
                "scenario": r.scenario,
                "variant": r.variant,
                "seed": r.seed,
                "experiment": r.experiment,
                "pairs": d.height,
                "delta_w": d["d_w"].mean(),
                "delta_l": d["d_l"].mean(),
                "accuracy_before": r.before["correct"].mean(),
                "accuracy": r.after["correct"].mean(),
            }
        )
    return rows


def pooled_pairs(runs: list[StudyRun]) -> pl.DataFrame:
    """Per pair: Δlp_w and Δlp_l averaged over the runs (seeds) that scored it, and how many did."""
    d = pl.concat([_deltas(r.pairs) for r in runs])
    return (
        d.group_by("pair_id")
        .agg(pl.col("edit_distance_norm").first(), pl.col("d_w").mean(), pl.col("d_l").mean(), pl.len().alias("seeds"))
        .sort("pair_id")
    )


def pooled_trained(runs: list[StudyRun]) -> pl.DataFrame | None:
    """Per pair of the fixed training subset: Δlp_w averaged over the runs that scored it; None if none did."""
    parts = [r.trained.select("pair_id", "edit_distance_norm", "d") for r in runs if r.trained is not None]
    if not parts:
        return None
    return (
        pl.concat(parts)
        .group_by("pair_id")
        .agg(pl.col("edit_distance_norm").first(), pl.col("d").mean(), pl.len().alias("seeds"))
        .sort("pair_id")
    )


def pooled_accuracy(runs: list[StudyRun]) -> np.ndarray:
    """Per test prompt: its share of correct answers over the runs minus its correctness before training."""
    before = runs[0].before.select("prompt_id", pl.col("correct").cast(pl.Float64).alias("before"))
    after = pl.concat([r.after.select("prompt_id", pl.col("correct").cast(pl.Float64)) for r in runs])
    j = after.group_by("prompt_id").agg(pl.col("correct").mean()).join(before, on="prompt_id", how="inner")
    if j.height != before.height:
        raise ValueError("study: the runs answered different test prompts than the starting policy")
    return (j["correct"] - j["before"]).to_numpy()


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


def judge_claim(interval: stats.Interval, test: stats.Test, direction: int, s: StatSettings) -> str:
    """reproduced / contradicted / not significant: the test rejects at α and the interval excludes zero on
    the claimed side (``direction`` +1: above zero, −1: below) or on the other."""
    if not test.rejects(s.alpha) or not interval.excludes_zero():
        return "not significant"
    return "reproduced" if (interval.low > 0) == (direction > 0) else "contradicted"


@dataclass(frozen=True)
class Claim:
    claim: str
    source: str
    scenario: str
    measure: str
    interval: stats.Interval
    test: stats.Test
    direction: int
    seeds_agree: str

    def row(self, s: StatSettings) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "source": self.source,
            "scenario": self.scenario,
            "measure": self.measure,
            "verdict": judge_claim(self.interval, self.test, self.direction, s),
            "estimate": self.interval.estimate,
            "low": self.interval.low,
            "high": self.interval.high,
            "test": self.test.name,
            "n": self.test.n,
            "p_value": self.test.p_value,
            "seeds": self.seeds_agree,
        }


def _agree(values: list[float], direction: int) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return f"{sum(1 for v in vals if v * direction > 0)} of {len(vals)}"


def study_claims(runs: list[StudyRun], roles: dict[str, str], s: StatSettings) -> list[Claim]:
    """The claims (docs/losses.md) a study can judge, per scenario: ``roles`` maps "dpo" and "dpop" to the study's
    variants that train with those losses (either may be absent)."""
    out: list[Claim] = []
    for scenario in sorted({r.scenario for r in runs}):
        by_variant = {
            v: [r for r in runs if r.scenario == scenario and r.variant == v] for v in {r.variant for r in runs}
        }
        seeds = {v: per_seed_rows(rs) for v, rs in by_variant.items()}
        dpo, dpop = roles.get("dpo"), roles.get("dpop")
        pooled = {v: pooled_pairs(rs) for v, rs in by_variant.items() if rs}
        if dpo in pooled:
            p = pooled[dpo]
            d_w, d_l = p["d_w"].to_numpy(), p["d_l"].to_numpy()
            _, below = stats.sign_test(d_w, level=s.level)
            out.append(
                Claim(
                    f"{dpo} (DPO) lowers lp_w of held-out chosen responses (likelihood displacement)",
                    "claim 1",
                    scenario,
                    "pooled mean Δlp_w per pair (nats)",
                    s.boot(d_w),
                    below,
                    -1,
                    _agree([r["delta_w"] for r in seeds[dpo]], -1),
                )
            )
            out.append(
                Claim(
                    f"{dpo} (DPO): lp_l falls too",
                    "claim 1",
                    scenario,
                    "pooled mean Δlp_l per pair (nats)",
                    s.boot(d_l),
                    stats.wilcoxon_test(d_l),
                    -1,
                    _agree([r["delta_l"] for r in seeds[dpo]], -1),
                )
            )
            margin = d_w - d_l
            out.append(
                Claim(
                    f"{dpo} (DPO): the margin grows while both fall",
                    "claim 1",
                    scenario,
                    "pooled mean Δlp_w − Δlp_l per pair (nats)",
                    s.boot(margin),
                    stats.wilcoxon_test(margin),
                    +1,
                    _agree([r["delta_w"] - r["delta_l"] for r in seeds[dpo]], +1),
                )
            )
            # On the pairs it trained on (held-out rejecteds were never pushed down); held-out if none were scored.
            trained = pooled_trained(by_variant[dpo])
            if trained is not None and trained.height > 2:
                x, y, which = trained["edit_distance_norm"].to_numpy(), trained["d"].to_numpy(), "fixed training subset"
                per_run = [
                    (r.trained["edit_distance_norm"].to_numpy(), r.trained["d"].to_numpy())
                    for r in by_variant[dpo]
                    if r.trained is not None
                ]
            else:
                x, y, which = p["edit_distance_norm"].to_numpy(), d_w, "held-out pairs"
                per_run = [
                    (d["edit_distance_norm"].to_numpy(), d["d_w"].to_numpy())
                    for d in (_deltas(r.pairs) for r in by_variant[dpo])
                ]
            sl, sl_test = stats.slope(x, y, level=s.level)
            out.append(
                Claim(
                    f"{dpo} (DPO): the fall of lp_w is strongest at low edit distance",
                    "claim 1",
                    scenario,
                    f"slope of pooled Δlp_w on normalised edit distance, {which} (nats per unit)",
                    sl,
                    sl_test,
                    +1,
                    _agree([stats.slope(a, b, level=s.level)[0].estimate for a, b in per_run], +1),
                )
            )
        if dpop in pooled:
            d_w = pooled[dpop]["d_w"].to_numpy()
            out.append(
                Claim(
                    f"{dpop} (DPOP) keeps lp_w at or above ref_w (reproduced: significantly above; not "
                    "significant: within noise of it)",
                    "claim 1",
                    scenario,
                    "pooled mean Δlp_w per pair (nats)",
                    s.boot(d_w),
                    stats.wilcoxon_test(d_w),
                    +1,
                    _agree([r["delta_w"] for r in seeds[dpop]], +1),
                )
            )
            if dpo in pooled:
                j = pooled[dpop].join(pooled[dpo], on="pair_id", suffix="_dpo")
                gap = (j["d_w"] - j["d_w_dpo"]).to_numpy()
                seed_gaps = [
                    a["delta_w"] - b["delta_w"] for a in seeds[dpop] for b in seeds[dpo] if a["seed"] == b["seed"]
                ]
                out.append(
                    Claim(
                        f"{dpop} (DPOP) ends with lp_w above {dpo} (DPO) on the same pairs",
                        "claim 1",
                        scenario,
                        "pooled mean Δlp_w(DPOP) − Δlp_w(DPO) per pair (nats)",
                        s.boot(gap),
                        stats.wilcoxon_test(gap),
                        +1,
                        _agree(seed_gaps, +1),
                    )
                )
    return out


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
