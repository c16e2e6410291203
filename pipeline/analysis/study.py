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
significant** otherwise. :mod:`pipeline.analysis.study_report` puts the three views and the claims in the
study's report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from pipeline.analysis import stats
from pipeline.analysis.findings import StatSettings


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
    # the experiment's pairs (pair_id, prompt_id, split, chosen_policy_logprob, rejected_policy_logprob, len_w,
    # len_l): what the scenario section reads (pipeline.analysis.scenario_study); None where not read
    pair_table: pl.DataFrame | None = None
    # train prompts that the pairs' seeded split holds out (pairs.heldout_fraction, pairs.seed), whether a pair
    # was made of them or not: the same prompts in every pair set of a study; None where not known
    heldout_prompts: int | None = None


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
    # a verdict decided by several tests together (the scenario ordering), instead of this row's own
    verdict: str | None = None

    def row(self, s: StatSettings) -> dict[str, Any]:
        return {
            "claim": self.claim,
            "source": self.source,
            "scenario": self.scenario,
            "measure": self.measure,
            "verdict": self.verdict or judge_claim(self.interval, self.test, self.direction, s),
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
        if dpo is not None and dpo in pooled:
            out += _dpo_claims(scenario, dpo, pooled[dpo], seeds[dpo], s)
            out.append(_distance_claim(scenario, dpo, pooled[dpo], by_variant[dpo], s))
        if dpop is not None and dpop in pooled:
            out += _dpop_claims(scenario, dpop, dpo, pooled, seeds, s)
    return out


def _dpo_claims(scenario: str, dpo: str, p: pl.DataFrame, seeds: list[dict[str, Any]], s: StatSettings) -> list[Claim]:
    """Claim 1 for DPO on its pooled held-out pairs ``p``: lp_w falls, lp_l falls too, the margin grows."""
    d_w, d_l = p["d_w"].to_numpy(), p["d_l"].to_numpy()
    _, below = stats.sign_test(d_w, level=s.level)
    margin = d_w - d_l
    return [
        Claim(
            f"{dpo} (DPO) lowers lp_w of held-out chosen responses (likelihood displacement)",
            "claim 1",
            scenario,
            "pooled mean Δlp_w per pair (nats)",
            s.boot(d_w),
            below,
            -1,
            _agree([r["delta_w"] for r in seeds], -1),
        ),
        Claim(
            f"{dpo} (DPO): lp_l falls too",
            "claim 1",
            scenario,
            "pooled mean Δlp_l per pair (nats)",
            s.boot(d_l),
            stats.wilcoxon_test(d_l),
            -1,
            _agree([r["delta_l"] for r in seeds], -1),
        ),
        Claim(
            f"{dpo} (DPO): the margin grows while both fall",
            "claim 1",
            scenario,
            "pooled mean Δlp_w − Δlp_l per pair (nats)",
            s.boot(margin),
            stats.wilcoxon_test(margin),
            +1,
            _agree([r["delta_w"] - r["delta_l"] for r in seeds], +1),
        ),
    ]


def _distance_claim(scenario: str, dpo: str, p: pl.DataFrame, runs: list[StudyRun], s: StatSettings) -> Claim:
    """Claim 1's edit distance: DPO's fall of lp_w is strongest at low distance. On the pairs it trained on
    (held-out rejecteds were never pushed down); on the held-out pairs ``p`` if none were scored."""
    trained = pooled_trained(runs)
    if trained is not None and trained.height > 2:
        x, y, which = trained["edit_distance_norm"].to_numpy(), trained["d"].to_numpy(), "fixed training subset"
        per_run = [
            (r.trained["edit_distance_norm"].to_numpy(), r.trained["d"].to_numpy())
            for r in runs
            if r.trained is not None
        ]
    else:
        x, y, which = p["edit_distance_norm"].to_numpy(), p["d_w"].to_numpy(), "held-out pairs"
        per_run = [(d["edit_distance_norm"].to_numpy(), d["d_w"].to_numpy()) for d in (_deltas(r.pairs) for r in runs)]
    sl, sl_test = stats.slope(x, y, level=s.level)
    return Claim(
        f"{dpo} (DPO): the fall of lp_w is strongest at low edit distance",
        "claim 1",
        scenario,
        f"slope of pooled Δlp_w on normalised edit distance, {which} (nats per unit)",
        sl,
        sl_test,
        +1,
        _agree([stats.slope(a, b, level=s.level)[0].estimate for a, b in per_run], +1),
    )


def _dpop_claims(
    scenario: str,
    dpop: str,
    dpo: str | None,
    pooled: dict[str, pl.DataFrame],
    seeds: dict[str, list[dict[str, Any]]],
    s: StatSettings,
) -> list[Claim]:
    """Claim 1 for DPOP: lp_w stays at or above ref_w, and (with a DPO variant) above DPO's on the same pairs."""
    d_w = pooled[dpop]["d_w"].to_numpy()
    out = [
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
    ]
    if dpo is not None and dpo in pooled:
        j = pooled[dpop].join(pooled[dpo], on="pair_id", suffix="_dpo")
        gap = (j["d_w"] - j["d_w_dpo"]).to_numpy()
        seed_gaps = [a["delta_w"] - b["delta_w"] for a in seeds[dpop] for b in seeds[dpo] if a["seed"] == b["seed"]]
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
