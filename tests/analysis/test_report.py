from pathlib import Path

from pipeline.analysis.report import build_report, findings


def _ev(dw, dl, share=0.5):
    return {"test_accuracy": 0.5, "heldout": {"n_pairs": 10, "delta_w": dw, "delta_l": dl, "displaced_share": share,
                                              "ref_w": -1.0, "ref_l": -2.0, "lp_w": -1.0 + dw, "lp_l": -2.0 + dl,
                                              "ref_w_per_token": -0.1, "ref_l_per_token": -0.2,
                                              "lp_w_per_token": -0.1, "lp_l_per_token": -0.2, "pair_accuracy": 0.9,
                                              "by_distance": {"[0.00,0.50)": {"n": 10, "delta_w": dw, "delta_l": dl,
                                                                              "displaced_share": share}}}}


def _series(vals):
    return [(i, v) for i, v in enumerate(vals)]


def test_findings_flag_what_the_figures_show():
    hist = {"delta_w": _series([0.0, 0.2, 0.4, 0.5, 0.3, 0.0, -0.3, -0.6]),
            "log10_grad_ratio": _series([0, 0, 0.5, 1, 2, 2.5, 3, 3]),
            "probe_greedy_lp": _series([-2.0, -1.5, -1.0])}
    words = " ".join(findings("dpo", _ev(-1.0, -3.0, 0.8), hist))
    for flag in ("likelihood displacement", "degradation", "drastic drop", "squeezing"):
        assert flag in words
    calm = " ".join(findings("dpop", _ev(0.3, -1.0, 0.1), {"delta_w": _series([0, 0.1, 0.2, 0.3, 0.3, 0.35]),
                                                             "log10_grad_ratio": _series([0, 0, 0.1, 0.1])}))
    assert "stayed above the reference" in calm
    assert not any(f in calm for f in ("displacement**", "degradation", "drastic drop", "squeezing"))


def test_build_report_writes_plots_and_tables(tmp_path: Path):
    hist = {"lp_w": _series([-1, -1.2]), "lp_l": _series([-2, -3]), "delta_margin": _series([0, 0.3]),
            "delta_w": _series([0, -0.2]), "delta_l": _series([0, -1]), "displaced_share": _series([0, 0.5]),
            "loss": _series([0.69, 0.6]), "accuracy": _series([0.5, 0.8]), "log10_grad_prob_w": _series([0, 0]),
            "log10_grad_prob_l": _series([0, 1]), "log10_grad_ratio": _series([0, 1]),
            "probe_greedy_lp": _series([-1, -0.9]), "displaced_share_0.00-0.50": _series([0.25, 0.75])}
    md = build_report("T", {"test_accuracy": 0.5}, {"dpo": _ev(-0.2, -1.0)}, {"dpo": hist}, {}, tmp_path)
    assert "| dpo | 10 | -1.00 (-0.100) | -1.20" in md and "| dpo | 50% (2 steps) |" in md
    for png in ("accuracy", "logprobs", "displacement", "loss", "gradients", "squeezing"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_scenario_table_side_by_side():
    from pipeline.analysis.report import scenario_table

    def ev(dw):
        return {"test_accuracy_before": 0.25, "test_accuracy": 0.5,
                "heldout": {"n_pairs": 2, "ref_w": -10.0, "lp_w": -10.0 + dw, "ref_l": -20.0, "lp_l": -25.0,
                            "delta_w": dw, "delta_l": -5.0, "displaced_share": 0.4, "pair_accuracy": 0.9}}

    pairs = {"scenario": 2, "n_pairs": 10, "n_train": 8, "n_heldout": 2, "mean_edit_distance_norm": 0.512,
             "on_policy": {"chosen_policy_logprob_per_token": -2.5, "rejected_policy_logprob_per_token": -0.41}}
    rows = [{"scenario": 2, "status": "done", "experiment": "x-s2", "pairs": pairs, "eval": ev(-3.0)},
            {"scenario": 4, "status": "failed", "experiment": "x-s4", "pairs": {}, "eval": {}},
            # scenario 1: its pairs metrics missing (n/a), eval present
            {"scenario": 1, "status": "done", "experiment": "x-s1", "pairs": {"n_train": 5}, "eval": ev(-0.5)}]
    md = scenario_table(rows, "dpo")
    lines = md.splitlines()
    assert lines[0] == "# Data scenarios side by side (`dpo`)"
    assert "REFERENCE" in md and "lp_w falls least" in md
    assert "In this run lp_w falls least in scenario 1 (Δ chosen -0.50), as claimed." in md
    # columns sorted by scenario, headed by the sources of chosen / rejected
    assert "| | 1: policy/policy | 2: gold/policy | 4: gold/other |" in lines
    table = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in lines
             if line.startswith("| ") and not line.startswith("| |")}
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
