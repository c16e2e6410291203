from pathlib import Path

import numpy as np
import polars as pl

from pipeline.analysis.findings import StatSettings
from pipeline.analysis.report import VariantInputs, build_report

S = StatSettings(alpha=0.05, level=0.95, n_resamples=1000, seed=0, drastic_drop_orders=1.0)


def _variant(rng, shift: float, n_right: int) -> VariantInputs:
    n = 30
    d_w = rng.normal(shift, 0.3, n)
    pairs = pl.DataFrame({"pair_id": [f"p{i:02d}" for i in range(n)], "variant": ["v"] * n, "ref_w": [-20.0] * n,
                          "ref_l": [-25.0] * n, "lp_w": -20.0 + d_w, "lp_l": -27.0 + rng.normal(0, 0.3, n),
                          "len_w": [10] * n, "len_l": [12] * n, "edit_distance_norm": np.linspace(0, 0.9, n),
                          "distance_bucket": ["0.00-0.50"] * 15 + ["0.50-1.00"] * 15,
                          # CHES tracks the fall of lp_w (the paper's claim), edit distance does not
                          "ches": -3.0 * d_w + rng.normal(0, 0.05, n), "ches_norm": -d_w + rng.normal(0, 0.02, n)}
                         ).with_columns(
        pl.col("len_w", "len_l").cast(pl.Int32))
    answers = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < n_right for i in range(40)]})
    fixed = pl.DataFrame([{"step": st, "set": w, "pair_id": f"p{i:02d}", "lp_w": -20.0 + d_w[i] * st / 8,
                           "lp_l": -25.0 - 2 * st / 8, "ref_w": -20.0, "ref_l": -25.0, "len_w": 10, "len_l": 12,
                           "log10_grad_ratio": 0.1 * st} for st in (0, 4, 8) for w in ("heldout", "train")
                          for i in range(n)])
    probe = pl.DataFrame([{"step": st, "probe": f"q{i}", "greedy_lp": -5.0 + 0.1 * st * (i % 3), "n_tokens": 9}
                          for st in (0, 8) for i in range(8)])
    return VariantInputs(eval={"heldout": {"ref_w": -20.0, "lp_w": -20.0 + float(d_w.mean())}}, pairs=pairs,
                         answers=answers, history={"loss": [(0, 0.69), (1, 0.6)], "accuracy": [(0, 0.5), (1, 0.7)],
                                                   "grad_norm": [(0, 1.0), (1, 0.9)]}, fixed=fixed, probe=probe)


def test_build_report_prints_intervals_and_tests_and_fires_only_where_they_reject(tmp_path: Path):
    rng = np.random.default_rng(0)
    start = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < 20 for i in range(40)]})
    md, record = build_report("T", start, {"dpo": _variant(rng, -1.0, 20), "dpop": _variant(rng, 0.0, 21)}, {},
                              tmp_path, S)
    assert "α = 0.05" in md and "1000 resamples" in md
    # accuracy: Wilson intervals and McNemar
    assert "| starting policy | 50.0% [" in md and "| dpop | 52.5% [" in md
    # held-out table: mean and median with intervals, share below with the sign test
    row = next(line for line in md.splitlines() if line.startswith("| dpo | 30 |"))
    assert row.count("[") == 5
    found = {(v, f["kind"]): f for v, r in record["variants"].items() for f in r["findings"]}
    assert found[("dpo", "displacement")]["fired"] and "**likelihood displacement**" in md
    assert not found[("dpop", "displacement")]["fired"]
    assert "`dpop`: change of held-out lp_w **not significant at this size**" in md
    assert not found[("dpo", "accuracy")]["fired"] and not found[("dpo", "drastic drop")]["fired"]
    assert record["between"][0]["delta_w_difference"]["low"] > 0  # dpop − dpo on the same pairs
    assert "the two differ at this size" in md
    assert "| dpo | " in md and "slope" in md
    ches_row = next(line for line in md.splitlines() if line.startswith("| dpo | ") and "predicts" in line)
    assert ches_row.endswith("| CHES_norm predicts better |")
    assert record["predictors"]["dpo"]["ches_norm"]["rho"]["high"] < -0.9
    for png in ("accuracy", "logprobs", "displacement", "loss", "gradients", "squeezing"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_trained_pairs_slope_on_edit_distance_fires_only_where_the_fall_depends_on_distance(tmp_path: Path):
    """The edit-distance table has a row for the trained pairs (the fixed training subset at the last step),
    whose slope of Δ chosen on edit distance is tested: an effect (low distance falls more) is found, noise
    is not; without the pairs' distances the row is left out."""
    rng = np.random.default_rng(1)
    start = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < 20 for i in range(40)]})
    dist = np.linspace(0.05, 0.6, 30)
    distances = pl.DataFrame({"pair_id": [f"p{i:02d}" for i in range(30)], "edit_distance_norm": dist,
                              "distance_bucket": ["[0.00,0.15)" if x < 0.15 else "[0.15,0.30)" if x < 0.3
                                                  else "[0.30,1.00]" for x in dist]})
    variants = {}
    for name, effect in (("dpo", 4.0), ("dpop", 0.0)):
        v = _variant(rng, 0.0, 20)
        d = -2.0 + effect * dist + rng.normal(0, 0.3, 30) if effect else rng.normal(0, 0.3, 30)
        v.fixed = v.fixed.with_columns(pl.when((pl.col("set") == "train") & (pl.col("step") == 8))
                                       .then(-20.0 + pl.col("pair_id").str.slice(1).cast(pl.Int64).map_elements(
                                           lambda i: float(d[i]), return_dtype=pl.Float64))
                                       .otherwise(pl.col("lp_w")).alias("lp_w"))
        variants[name] = v
    md, record = build_report("T", start, variants, {}, tmp_path, S, distances)
    slope = record["trained_pairs_slope"]
    assert slope["dpo"]["n"] == 30 and slope["dpo"]["slope"]["low"] > 0 and slope["dpo"]["test"]["p_value"] < 0.05
    assert abs(slope["dpo"]["slope"]["estimate"] - 4.0) < 1.5  # the least-squares slope recovers the effect
    assert slope["dpop"]["test"]["p_value"] > 0.05
    rows = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in md.splitlines()
            if "trained (fixed subset)" in line}
    assert set(rows) == {"| dpo | trained (fixed subset)", "| dpop | trained (fixed subset)"}
    counts = [int((distances["distance_bucket"] == b).sum()) for b in sorted(set(distances["distance_bucket"]))]
    assert all(f"(n={c})" in rows["| dpo | trained (fixed subset)"] for c in counts)
    assert "< α = 0.05)" in rows["| dpo | trained (fixed subset)"]
    assert "≥ α = 0.05)" in rows["| dpop | trained (fixed subset)"]
    md, record = build_report("T", start, variants, {}, tmp_path, S)
    assert "trained (fixed subset)" not in md and "trained_pairs_slope" not in record
