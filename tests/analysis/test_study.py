"""pipeline/analysis/study.py and study_report.py: a multi-seed study's pooled statistics, claim verdicts and
report, against numbers computed here independently (numpy, scipy), on synthetic runs with and without an
effect."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats as st
from study_runs import generations, pair_eval

from pipeline.analysis import study, study_report
from pipeline.analysis.findings import StatSettings

SETTINGS = StatSettings(alpha=0.05, level=0.95, n_resamples=2000, seed=0, drastic_drop_orders=1.0)
N_PAIRS, N_PROMPTS = 40, 60


def _pairs(variant: str, d_w: np.ndarray, d_l: np.ndarray, dist: np.ndarray) -> pl.DataFrame:
    return pair_eval(variant, [f"p{i:03d}" for i in range(len(d_w))], d_w, d_l, dist)


_gens = generations


def _runs(effect: bool, seeds=(0, 1, 2), draw: int = 7) -> list[study.StudyRun]:
    rng = np.random.default_rng(draw)
    dist = rng.uniform(0.05, 0.6, N_PAIRS)
    pair_base = rng.normal(0, 1, N_PAIRS)  # a per-pair effect the seeds share
    before = _gens(rng.random(N_PROMPTS) < 0.5, "policy")
    train_dist = rng.uniform(0.05, 0.6, 30)
    runs = []
    for seed in seeds:
        noise = rng.normal(0, 1, N_PAIRS)
        if effect:
            dpo_w = -3.0 + pair_base + noise  # falls; on held-out pairs whatever the distance
            dpo_l = -8.0 + noise
            dpop_w = 0.5 + 0.3 * noise
            trained_d = -3.0 + 4.0 * train_dist + rng.normal(0, 1, 30)  # trained pairs: least at large distance
        else:
            dpo_w, dpo_l, dpop_w = pair_base + noise, rng.normal(0, 1, N_PAIRS), rng.normal(0, 1, N_PAIRS)
            trained_d = rng.normal(0, 1, 30)
        trained = pl.DataFrame(
            {"pair_id": [f"t{i:02d}" for i in range(30)], "d": trained_d, "edit_distance_norm": train_dist}
        )
        runs.append(
            study.StudyRun(
                f"x-seed{seed}",
                "default",
                seed,
                "dpo",
                _pairs("dpo", dpo_w, dpo_l, dist),
                before,
                _gens(rng.random(N_PROMPTS) < (0.1 if effect else 0.5), "dpo"),
                trained,
            )
        )
        runs.append(
            study.StudyRun(
                f"x-seed{seed}",
                "default",
                seed,
                "dpop",
                _pairs("dpop", dpop_w, rng.normal(-1, 1, N_PAIRS), dist),
                before,
                _gens(before["correct"].to_numpy(), "dpop"),
            )
        )
    return runs


ROLES = {"dpo": "dpo", "dpop": "dpop"}


def test_pooled_figures_match_an_independent_computation():
    runs = _runs(effect=True)
    dpo = [r for r in runs if r.variant == "dpo"]
    stacked = np.stack([(r.pairs["lp_w"] - r.pairs["ref_w"]).to_numpy() for r in dpo])  # [seeds, pairs]
    pooled = study.pooled_pairs(dpo)
    assert pooled["d_w"].to_numpy() == pytest.approx(stacked.mean(0)) and set(pooled["seeds"]) == {3}
    summary = {r["variant"]: r for r in study_report.study_summary(runs, SETTINGS)}["dpo"]
    per_seed = stacked.mean(1)
    assert summary["delta_w_seeds"]["mean"] == pytest.approx(per_seed.mean())
    assert summary["delta_w_seeds"]["sd"] == pytest.approx(per_seed.std(ddof=1))
    boot = st.bootstrap(
        (stacked.mean(0),), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile", random_state=0
    )
    assert summary["delta_w"].estimate == pytest.approx(stacked.mean())
    # the project's bootstrap (stats.bootstrap_ci) against scipy's own percentile interval, within resampling noise
    assert summary["delta_w"].low == pytest.approx(boot.confidence_interval.low, abs=0.15)
    assert summary["delta_w"].high == pytest.approx(boot.confidence_interval.high, abs=0.15)
    below = int((stacked.mean(0) < 0).sum())
    assert summary["below_test"].p_value == pytest.approx(st.binomtest(below, N_PAIRS).pvalue)
    # accuracy: each prompt's share correct over the seeds minus its correctness before
    acc = np.stack([r.after["correct"].to_numpy() for r in dpo]).mean(0) - dpo[0].before["correct"].to_numpy()
    assert summary["accuracy_change"].estimate == pytest.approx(acc.mean())
    assert summary["accuracy_test"].p_value == pytest.approx(st.wilcoxon(acc).pvalue)


def test_claims_are_reproduced_on_an_effect_and_not_on_noise():
    def verdicts(runs):
        return {
            (c.claim.split(":")[0].split(" (")[0] + ":" + c.measure): c.row(SETTINGS)["verdict"]
            for c in study.study_claims(runs, ROLES, SETTINGS)
        }

    effect = verdicts(_runs(effect=True))
    assert len(effect) == 6 and set(effect.values()) == {"reproduced"}, effect
    # on noise a claim fires only at the tests' false-positive rate (α = 0.05 each): over 20 draws of 6 claims
    fired = [v for draw in range(20) for v in verdicts(_runs(effect=False, draw=draw)).values()]
    assert len(fired) == 120 and sum(v != "not significant" for v in fired) <= 15


def test_the_edit_distance_claim_is_judged_on_the_trained_pairs():
    """Held-out rejecteds were never trained on: the slope claim reads the fixed training subset, and only
    without one the held-out pairs (saying which)."""
    runs = _runs(effect=True)
    slope = next(c for c in study.study_claims(runs, ROLES, SETTINGS) if "edit distance" in c.claim)
    assert "fixed training subset" in slope.measure and slope.row(SETTINGS)["verdict"] == "reproduced"
    trained = study.pooled_trained([r for r in runs if r.variant == "dpo"])
    want = np.polyfit(trained["edit_distance_norm"].to_numpy(), trained["d"].to_numpy(), 1)[0]
    assert slope.interval.estimate == pytest.approx(want) and slope.interval.estimate == pytest.approx(4.0, abs=1.5)
    held = [study.StudyRun(r.experiment, r.scenario, r.seed, r.variant, r.pairs, r.before, r.after) for r in runs]
    slope = next(c for c in study.study_claims(held, ROLES, SETTINGS) if "edit distance" in c.claim)
    pooled = study.pooled_pairs([r for r in held if r.variant == "dpo"])
    assert "held-out pairs" in slope.measure
    assert slope.interval.estimate == pytest.approx(
        np.polyfit(pooled["edit_distance_norm"].to_numpy(), pooled["d_w"].to_numpy(), 1)[0]
    )


def test_a_contradicted_claim_is_called_so():
    runs = _runs(effect=True)
    flipped = [
        study.StudyRun(
            r.experiment,
            r.scenario,
            r.seed,
            r.variant,
            r.pairs.with_columns((2 * pl.col("ref_w") - pl.col("lp_w")).alias("lp_w")),
            r.before,
            r.after,
        )
        if r.variant == "dpo"
        else r
        for r in runs
    ]
    rows = [c.row(SETTINGS) for c in study.study_claims(flipped, ROLES, SETTINGS)]
    displacement = next(r for r in rows if "likelihood displacement" in r["claim"])
    assert displacement["verdict"] == "contradicted" and displacement["estimate"] > 0


def test_report_markdown_and_record():
    md, record = study_report.study_report(
        _runs(effect=True), ROLES, SETTINGS, "Study t", "python -m pipeline.flows study"
    )
    assert md.startswith("# Study t") and "## Claims (docs/losses.md)" in md and "**reproduced**" in md
    assert md.count("| default | dpo | ") == 4 and md.count("| default | dpop | ") == 4  # 1 summary + 3 seeds each
    json.dumps(record, allow_nan=False)  # every figure serialisable, no NaN
    assert {c["verdict"] for c in record["claims"]} <= {"reproduced", "contradicted", "not significant"}
    assert len(record["per_seed"]) == 6 and record["summary"][0]["delta_w"]["level"] == 0.95


def test_judge_claim_needs_both_the_test_and_the_interval():
    from pipeline.analysis.stats import Interval, Test

    below = Interval(-1.0, -1.5, -0.5, 0.95)
    across = Interval(-1.0, -2.0, 0.5, 0.95)
    assert study.judge_claim(below, Test("t", 0.01, 20), -1, SETTINGS) == "reproduced"
    assert study.judge_claim(below, Test("t", 0.01, 20), +1, SETTINGS) == "contradicted"
    assert study.judge_claim(below, Test("t", 0.2, 20), -1, SETTINGS) == "not significant"
    assert study.judge_claim(across, Test("t", 0.01, 20), -1, SETTINGS) == "not significant"
