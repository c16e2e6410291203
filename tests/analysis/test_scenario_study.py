"""pipeline/analysis/scenario_study.py: the scenarios' pairs, accuracy per seed and the ordering of claim 3, against
numbers computed here independently (numpy, scipy, statsmodels), on synthetic runs with and without an ordering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from study_runs import N_HELD, scenario_runs

from pipeline.analysis import scenario_study, study_report
from pipeline.analysis.findings import StatSettings
from pipeline.analysis.study import StudyRun

SETTINGS = StatSettings(alpha=0.05, level=0.95, n_resamples=2000, seed=0, drastic_drop_orders=1.0)
ROLES = {"dpo": "dpo"}


def _per_prompt(runs: list[StudyRun], k: int) -> dict[str, float]:
    """Each held-out prompt's Δlp_w in scenario k averaged over the seeds (pair h<i>-s<k> is prompt h<i>)."""
    rs = [r for r in runs if r.scenario == f"scenario {k}"]
    stacked = np.stack([(r.pairs["lp_w"] - r.pairs["ref_w"]).to_numpy() for r in rs])
    return dict(zip((p.split("-")[0] for p in rs[0].pairs["pair_id"]), stacked.mean(0)))


def _by_comparison(claims) -> dict[str, scenario_study.Claim]:
    return {c.scenario: c for c in claims}


def test_ordering_is_reproduced_when_scenario_1_falls_least_and_matches_an_independent_computation():
    runs = scenario_runs({1: -0.5, 2: -3.0, 3: -3.0, 4: -3.0})
    claims = scenario_study.ordering_claims(runs, "dpo", SETTINGS)
    rows = {c.scenario: c.row(SETTINGS) for c in claims}
    assert set(rows) == {"scenario 1 vs 2", "scenario 1 vs 3", "scenario 1 vs 4", "1, 2, 3, 4"}
    assert {r["verdict"] for r in rows.values()} == {"reproduced"}
    first = _per_prompt(runs, 1)
    diffs = {k: np.array([first[p] - v for p, v in _per_prompt(runs, k).items()]) for k in (2, 3, 4)}
    holm = multipletests([st.wilcoxon(diffs[k]).pvalue for k in (2, 3, 4)], method="holm")[1]
    for k, p in zip((2, 3, 4), holm):
        c = _by_comparison(claims)[f"scenario 1 vs {k}"]
        assert c.interval.estimate == pytest.approx(diffs[k].mean())
        assert c.test.p_value == pytest.approx(p) and c.test.n == N_HELD
        assert c.interval.level == pytest.approx(1 - 0.05 / 3)  # Bonferroni over the three comparisons
        assert c.seeds_agree == "3 of 3"
    whole = _by_comparison(claims)["1, 2, 3, 4"]
    assert whole.interval.estimate == pytest.approx(min(d.mean() for d in diffs.values()))


def test_another_scenario_significantly_higher_contradicts_the_ordering():
    claims = _by_comparison(scenario_study.ordering_claims(scenario_runs({1: -3.0, 2: -3.0, 3: 0.0}), "dpo", SETTINGS))
    assert claims["scenario 1 vs 3"].row(SETTINGS)["verdict"] == "contradicted"
    assert claims["scenario 1 vs 2"].row(SETTINGS)["verdict"] == "not significant"
    assert claims["1, 2, 3"].row(SETTINGS)["verdict"] == "contradicted"
    # higher than one scenario only: not reproduced
    partial = _by_comparison(
        scenario_study.ordering_claims(scenario_runs({1: -0.5, 2: -3.0, 4: -0.5}), "dpo", SETTINGS)
    )
    assert partial["scenario 1 vs 2"].row(SETTINGS)["verdict"] == "reproduced"
    assert partial["1, 2, 4"].row(SETTINGS)["verdict"] == "not significant"


def test_without_an_ordering_the_claim_rarely_fires():
    verdicts = [
        _by_comparison(
            scenario_study.ordering_claims(scenario_runs(dict.fromkeys((1, 2, 3, 4), -2.0), draw), "dpo", SETTINGS)
        )["1, 2, 3, 4"].row(SETTINGS)["verdict"]
        for draw in range(20)
    ]
    assert "reproduced" not in verdicts and verdicts.count("contradicted") <= 3


def test_comparisons_use_the_prompts_with_a_pair_in_both_and_the_counts_are_stated():
    runs = scenario_runs({1: -0.5, 2: -3.0}, covered={1: 15})
    (pair_wise, _) = scenario_study.ordering_claims(runs, "dpo", SETTINGS)
    assert pair_wise.test.n == 15
    rows = {r["scenario"]: r for r in scenario_study.pair_set_rows(runs, SETTINGS)}
    assert (rows["scenario 1"]["heldout_prompts_with_pair"], rows["scenario 1"]["heldout_prompts"]) == (15, 50)
    assert (rows["scenario 2"]["heldout_pairs"], rows["scenario 2"]["train_pairs"]) == (N_HELD, N_HELD)
    assert rows["scenario 1"]["experiments"] == ["x-s1-seed0", "x-s1-seed1", "x-s1-seed2"]
    # on-policy: the mean per-token log-prob under the starting policy over the scenario's pairs
    table = next(r.pair_table for r in runs if r.scenario == "scenario 2")
    assert rows["scenario 2"]["chosen_per_token"].estimate == pytest.approx(
        (table["chosen_policy_logprob"] / 10).mean()
    )
    assert rows["scenario 2"]["rejected_per_token"].estimate == pytest.approx(
        (table["rejected_policy_logprob"] / 10).mean()
    )
    assert rows["scenario 2"]["rejected_per_token"].high < rows["scenario 1"]["rejected_per_token"].low


def test_mcnemar_per_seed_against_statsmodels_with_holm_over_the_seeds():
    runs = scenario_runs({1: -0.5, 2: -3.0})
    rows = [r for r in scenario_study.mcnemar_rows(runs, SETTINGS) if r["scenario"] == "scenario 2"]
    assert [r["seed"] for r in rows] == [0, 1, 2]
    raw = []
    for r, run in zip(rows, [x for x in runs if x.scenario == "scenario 2"]):
        a, b = run.before["correct"].to_numpy(), run.after["correct"].to_numpy()
        table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
        raw.append(mcnemar(table, exact=True).pvalue)
        assert r["test"].p_value == pytest.approx(raw[-1])
        assert (r["only_before"], r["only_after"]) == (table[0][1], table[1][0])
        assert r["change"].estimate == pytest.approx(b.mean() - a.mean())
    assert [r["p_holm"] for r in rows] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert all(r["rejects"] for r in rows)  # 50 % right before, 20 % after on 60 prompts


def test_the_study_report_gets_a_scenario_section_and_the_ordering_claim():
    md, record = study_report.study_report(
        scenario_runs({1: -0.5, 2: -3.0, 3: -3.0, 4: -3.0}),
        ROLES,
        SETTINGS,
        "Scenarios t",
        "python -m pipeline.flows study",
    )
    json.dumps(record, allow_nan=False)
    assert "## Scenarios" in md and "| scenario 3 | policy/other | 3 | 40 of 50 | 40 | 40 |" in md
    assert "McNemar rejects after Holm in 3 of 3 seeds" in md
    assert "the scenario ordering" not in md.split("## Scenarios")[0]
    assert [c["verdict"] for c in record["claims"] if c["source"] == "claim 3"] == ["reproduced"] * 4
    assert len(record["scenarios"]["pair_sets"]) == 4 and len(record["scenarios"]["mcnemar"]) == 12
    # without scenario 1 the ordering cannot be judged, and the report says so
    md, record = study_report.study_report(
        scenario_runs({2: -3.0, 3: -3.0}), ROLES, SETTINGS, "Scenarios t", "python -m pipeline.flows study"
    )
    assert "the scenario ordering (claim 3, needs scenario 1 and another scenario)" in md
    assert not [c for c in record["claims"] if c["source"] == "claim 3"]
