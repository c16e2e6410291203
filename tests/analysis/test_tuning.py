"""pipeline/analysis/tuning.py: the selection on validation accuracy, every grid point's interval, and the kept
settings compared on the same test prompts and held-out pairs, against scipy and statsmodels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from study_runs import generations, variant_runs

from pipeline.analysis import tuning
from pipeline.analysis.findings import StatSettings
from pipeline.analysis.study import StudyRun

SETTINGS = StatSettings(alpha=0.05, level=0.95, n_resamples=2000, seed=0, drastic_drop_orders=1.0)


def point(name: str, variant: str, right: int | None, n: int = 20, **setting) -> tuning.GridPoint:
    answers = None if right is None else generations(np.arange(n) < right, variant)
    return tuning.GridPoint(name, variant, setting, answers)


def test_each_variant_keeps_its_best_validation_accuracy_and_a_tie_goes_to_the_first():
    points = [
        point("g-dpo-0", "dpo", 5, lr=1e-5, beta=0.1),
        point("g-dpo-1", "dpo", 12, lr=5e-6, beta=0.1),
        point("g-dpo-2", "dpo", 12, lr=2e-6, beta=0.1),  # ties with g-dpo-1, listed later
        point("g-dpo-3", "dpo", None, lr=2e-6, beta=0.3),  # failed
        point("g-dpop-0", "dpop", 9, lr=1e-5, dpop_lambda=50.0),
        point("g-dpop-1", "dpop", 8, lr=5e-6, dpop_lambda=50.0),
        point("g-ipo-0", "ipo", None, lr=1e-5),  # every point failed: nothing kept
    ]
    kept = tuning.select(points)
    assert {v: p.experiment for v, p in kept.items()} == {"dpo": "g-dpo-1", "dpop": "g-dpop-0"}
    rows = tuning.grid_rows(points, kept, SETTINGS)
    assert [r["selected"] for r in rows] == [False, True, False, False, True, False, False]
    assert rows[3]["status"] == "failed" and rows[3]["val_prompts"] == 0
    lo, hi = proportion_confint(12, 20, alpha=0.05, method="wilson")
    assert (rows[1]["val_accuracy"].estimate, rows[1]["val_accuracy"].low, rows[1]["val_accuracy"].high) == (
        pytest.approx(0.6),
        pytest.approx(lo),
        pytest.approx(hi),
    )
    assert tuning.setting_text(points[1].setting) == "lr 5e-06, beta 0.1"


def test_the_kept_settings_compared_match_an_independent_computation():
    runs = variant_runs()
    (c,) = tuning.comparisons(runs, ["dpo", "dpop"], SETTINGS)
    assert (c["a"], c["b"], c["seeds"], c["prompts"], c["pairs"]) == ("dpo", "dpop", [0, 1, 2], 80, 30)

    def stacked(variant, f):
        return np.stack([f(r) for r in runs if r.variant == variant]).mean(0)

    acc = stacked("dpop", lambda r: r.after["correct"].to_numpy()) - stacked(
        "dpo", lambda r: r.after["correct"].to_numpy()
    )
    assert c["accuracy_difference"].estimate == pytest.approx(acc.mean())
    assert c["accuracy_test"].p_value == pytest.approx(st.wilcoxon(acc[acc != 0]).pvalue)
    d_w = stacked("dpop", lambda r: (r.pairs["lp_w"] - r.pairs["ref_w"]).to_numpy()) - stacked(
        "dpo", lambda r: (r.pairs["lp_w"] - r.pairs["ref_w"]).to_numpy()
    )
    assert c["delta_w_difference"].estimate == pytest.approx(d_w.mean()) and c["delta_w_difference"].low > 0
    raw = []
    for seed, row in zip((0, 1, 2), c["per_seed"]):
        a, b = (
            next(r for r in runs if r.variant == v and r.seed == seed).after["correct"].to_numpy()
            for v in ("dpo", "dpop")
        )
        raw.append(
            mcnemar(
                [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]], exact=True
            ).pvalue
        )
        assert row["test"].p_value == pytest.approx(raw[-1]) and row["change"].estimate == pytest.approx(
            b.mean() - a.mean()
        )
    assert [r["p_holm"] for r in c["per_seed"]] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert all(r["rejects"] for r in c["per_seed"])


def test_no_difference_is_seldom_called_one():
    rejected = 0
    for draw in range(20):
        runs = [r for r in variant_runs(draw=draw) if r.variant == "dpop"]
        twin = [
            StudyRun(
                r.experiment,
                r.scenario,
                r.seed,
                "twin",
                r.pairs,
                r.before,
                generations(np.random.default_rng(100 * draw + r.seed).random(80) < 0.5, "twin"),
            )
            for r in runs
        ]
        (c,) = tuning.comparisons(runs + twin, ["dpop", "twin"], SETTINGS)
        rejected += c["accuracy_test"].rejects(SETTINGS.alpha)
    assert rejected <= 3


def test_tuning_sections_and_record():
    points = [point("g-dpo-0", "dpo", 5, lr=1e-5, beta=0.1), point("g-dpop-0", "dpop", 9, lr=1e-5, dpop_lambda=50.0)]
    kept = tuning.select(points)
    rows = tuning.grid_rows(points, kept, SETTINGS)
    compared = tuning.comparisons(variant_runs(), ["dpo", "dpop"], SETTINGS)
    grid = {"dpo": {"lr": [1e-5], "beta": [0.1]}, "dpop": {"lr": [1e-5], "dpop_lambda": [50.0]}}
    lines = tuning.tuning_lines(grid, 0, rows, 0.45, compared, SETTINGS)
    md = "\n".join(lines)
    assert "## Grid and selection" in md and "on 20 validation prompts" in md and "answers 45.0 % of them" in md
    assert "| dpo | lr 1e-05, beta 0.1 | `g-dpo-0` | 25.0% [" in md and md.count("**kept**") == 2
    assert "`dpop` − `dpo` over seeds 0, 1, 2:" in md and "seed 2:" in md
    record = tuning.tuning_record(grid, 0, rows, 0.45, kept, compared)
    json.dumps(record, allow_nan=False)
    assert record["selected"]["dpo"] == {
        "experiment": "g-dpo-0",
        "setting": {"lr": 1e-5, "beta": 0.1},
        "val_accuracy": 0.25,
    }
    assert record["n_val"] == 20 and record["comparisons"][0]["accuracy_difference"]["level"] == 0.95
