"""pipeline/analysis/scenarios.py: the data scenarios side by side, one column per experiment."""

from __future__ import annotations

from pipeline.analysis.scenarios import scenario_table


def test_scenario_table_side_by_side():
    def ev(dw):
        return {
            "test_accuracy_before": 0.25,
            "test_accuracy": 0.5,
            "heldout": {
                "n_pairs": 2,
                "ref_w": -10.0,
                "lp_w": -10.0 + dw,
                "ref_l": -20.0,
                "lp_l": -25.0,
                "delta_w": dw,
                "delta_l": -5.0,
                "displaced_share": 0.4,
                "pair_accuracy": 0.9,
            },
        }

    pairs = {
        "scenario": 2,
        "n_pairs": 10,
        "n_train": 8,
        "n_heldout": 2,
        "mean_edit_distance_norm": 0.512,
        "on_policy": {"chosen_policy_logprob_per_token": -2.5, "rejected_policy_logprob_per_token": -0.41},
    }
    rows = [
        {"scenario": 2, "status": "done", "experiment": "x-s2", "pairs": pairs, "eval": ev(-3.0)},
        {"scenario": 4, "status": "failed", "experiment": "x-s4", "pairs": {}, "eval": {}},
        # scenario 1: its pairs metrics missing (n/a), eval present
        {"scenario": 1, "status": "done", "experiment": "x-s1", "pairs": {"n_train": 5}, "eval": ev(-0.5)},
    ]
    md = scenario_table(rows, "dpo")
    lines = md.splitlines()
    assert lines[0] == "# Data scenarios side by side (`dpo`)"
    assert "Claim 3 of docs/losses.md" in md and "lp_w falls least" in md
    assert "In this run lp_w falls least in scenario 1 (Δ chosen -0.50), as claimed." in md
    # columns sorted by scenario, headed by the sources of chosen / rejected
    assert "| | 1: policy/policy | 2: gold/policy | 4: gold/other |" in lines
    table = {
        line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:]
        for line in lines
        if line.startswith("| ") and not line.startswith("| |")
    }
    assert table["experiment"] == ["`x-s1`", "`x-s2`", "`x-s4`"]
    assert table["status"] == ["done", "done", "**failed**"]
    assert table["train pairs"] == ["5", "8", "failed"]
    assert table["held-out pairs"] == ["n/a", "2", "failed"]
    assert table["chosen: log-prob per token under the starting policy"] == ["n/a", "-2.500", "failed"]
    assert table["rejected: log-prob per token under the starting policy"] == ["n/a", "-0.410", "failed"]
    assert table["held-out chosen before (ref_w)"] == ["-10.00", "-10.00", "failed"]
    assert table["held-out chosen after (lp_w)"] == ["-10.50", "-13.00", "failed"]
    assert table["Δ chosen (lp_w − ref_w)"] == ["-0.50", "-3.00", "failed"]
    assert table["held-out rejected after (lp_l)"] == ["-25.00", "-25.00", "failed"]
    assert table["Δ rejected (lp_l − ref_l)"] == ["-5.00", "-5.00", "failed"]
    assert table["held-out pairs with lp_w < ref_w"] == ["40%", "40%", "failed"]
    assert table["held-out pair accuracy (lp_w − lp_l > ref_w − ref_l)"] == ["90%", "90%", "failed"]
    assert table["test accuracy before (starting policy)"] == ["25.0%", "25.0%", "failed"]
    assert table["test accuracy after"] == ["50.0%", "50.0%", "failed"]
    assert table["mean normalised edit distance chosen↔rejected"] == ["n/a", "0.512", "failed"]

    # scenario 1 not the mildest: said so; a lone finished scenario gets no comparison sentence
    md = scenario_table([{**rows[0], "eval": ev(0.2)}, rows[2]], "dpop")
    assert "lp_w falls least in scenario 2 (Δ chosen +0.20), not in scenario 1." in md
    assert "In this run" not in scenario_table([rows[0], rows[1]], "dpo")
