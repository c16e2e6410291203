from pathlib import Path

from pipeline.report import build_report, findings


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
    hist = {"lp_w": _series([-1, -1.2]), "lp_l": _series([-2, -3]), "margin": _series([0, 0.3]),
            "delta_w": _series([0, -0.2]), "delta_l": _series([0, -1]), "displaced_share": _series([0, 0.5]),
            "loss": _series([0.69, 0.6]), "accuracy": _series([0.5, 0.8]), "log10_grad_prob_w": _series([0, 0]),
            "log10_grad_prob_l": _series([0, 1]), "log10_grad_ratio": _series([0, 1]),
            "probe_greedy_lp": _series([-1, -0.9]), "displaced_share_0.00-0.50": _series([0.25, 0.75])}
    md = build_report("T", {"test_accuracy": 0.5}, {"dpo": _ev(-0.2, -1.0)}, {"dpo": hist}, {}, tmp_path)
    assert "| dpo | 10 | -1.00 (-0.100) | -1.20" in md and "| dpo | 50% (2 steps) |" in md
    for png in ("accuracy", "logprobs", "displacement", "loss", "gradients", "squeezing"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
