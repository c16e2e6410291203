"""pipeline/analysis/report.py and report_render.py: the report's figures and findings, and the Markdown and
plots rendered from those figures alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.analysis.findings import StatSettings, json_safe
from pipeline.analysis.report import VariantInputs, compute_report, findings_record
from pipeline.analysis.report_render import render_report

SETTINGS = StatSettings(alpha=0.05, level=0.95, n_resamples=1000, seed=0, drastic_drop_orders=1.0)


def build_report(title, start, variants, out_dir, distances=None) -> tuple[str, dict]:
    """The stage's two steps: the report's Markdown (PNGs into ``out_dir``) and its findings.json record."""
    figures = compute_report(start, variants, {}, SETTINGS, distances)
    return render_report(title, figures, out_dir), findings_record(figures)


def _variant(rng, shift: float, n_right: int) -> VariantInputs:
    n = 30
    d_w = rng.normal(shift, 0.3, n)
    pairs = pl.DataFrame(
        {
            "pair_id": [f"p{i:02d}" for i in range(n)],
            "variant": ["v"] * n,
            "ref_w": [-20.0] * n,
            "ref_l": [-25.0] * n,
            "lp_w": -20.0 + d_w,
            "lp_l": -27.0 + rng.normal(0, 0.3, n),
            "len_w": [10] * n,
            "len_l": [12] * n,
            "edit_distance_norm": np.linspace(0, 0.9, n),
            "distance_bucket": ["0.00-0.50"] * 15 + ["0.50-1.00"] * 15,
            # CHES tracks the fall of lp_w (the paper's claim), edit distance does not
            "ches": -3.0 * d_w + rng.normal(0, 0.05, n),
            "ches_norm": -d_w + rng.normal(0, 0.02, n),
        }
    ).with_columns(pl.col("len_w", "len_l").cast(pl.Int32))
    answers = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < n_right for i in range(40)]})
    fixed = pl.DataFrame(
        [
            {
                "step": st,
                "set": w,
                "pair_id": f"p{i:02d}",
                "lp_w": -20.0 + d_w[i] * st / 8,
                "lp_l": -25.0 - 2 * st / 8,
                "ref_w": -20.0,
                "ref_l": -25.0,
                "len_w": 10,
                "len_l": 12,
                "log10_grad_ratio": 0.1 * st,
            }
            for st in (0, 4, 8)
            for w in ("heldout", "train")
            for i in range(n)
        ]
    )
    probe = pl.DataFrame(
        [
            {"step": st, "probe": f"q{i}", "greedy_lp": -5.0 + 0.1 * st * (i % 3), "n_tokens": 9}
            for st in (0, 8)
            for i in range(8)
        ]
    )
    return VariantInputs(
        eval={"heldout": {"ref_w": -20.0, "lp_w": -20.0 + float(d_w.mean())}},
        pairs=pairs,
        answers=answers,
        history={"loss": [(0, 0.69), (1, 0.6)], "accuracy": [(0, 0.5), (1, 0.7)], "grad_norm": [(0, 1.0), (1, 0.9)]},
        fixed=fixed,
        probe=probe,
    )


def test_build_report_prints_intervals_and_tests_and_fires_only_where_they_reject(tmp_path: Path):
    rng = np.random.default_rng(0)
    start = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < 20 for i in range(40)]})
    md, record = build_report("T", start, {"dpo": _variant(rng, -1.0, 20), "dpop": _variant(rng, 0.0, 21)}, tmp_path)
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
    distances = pl.DataFrame(
        {
            "pair_id": [f"p{i:02d}" for i in range(30)],
            "edit_distance_norm": dist,
            "distance_bucket": [
                "[0.00,0.15)" if x < 0.15 else "[0.15,0.30)" if x < 0.3 else "[0.30,1.00]" for x in dist
            ],
        }
    )
    variants = {}
    for name, effect in (("dpo", 4.0), ("dpop", 0.0)):
        v = _variant(rng, 0.0, 20)
        d = -2.0 + effect * dist + rng.normal(0, 0.3, 30) if effect else rng.normal(0, 0.3, 30)
        v.fixed = v.fixed.with_columns(
            pl.when((pl.col("set") == "train") & (pl.col("step") == 8))
            .then(
                -20.0
                + pl.col("pair_id")
                .str.slice(1)
                .cast(pl.Int64)
                .map_elements(lambda i, d=d: float(d[i]), return_dtype=pl.Float64)
            )
            .otherwise(pl.col("lp_w"))
            .alias("lp_w")
        )
        variants[name] = v
    md, record = build_report("T", start, variants, tmp_path, distances)
    slope = record["trained_pairs_slope"]
    assert slope["dpo"]["n"] == 30 and slope["dpo"]["slope"]["low"] > 0 and slope["dpo"]["test"]["p_value"] < 0.05
    assert abs(slope["dpo"]["slope"]["estimate"] - 4.0) < 1.5  # the least-squares slope recovers the effect
    assert slope["dpop"]["test"]["p_value"] > 0.05
    rows = {
        line.split(" | ")[0] + " | " + line.split(" | ")[1]: line
        for line in md.splitlines()
        if "trained (fixed subset)" in line
    }
    assert set(rows) == {"| dpo | trained (fixed subset)", "| dpop | trained (fixed subset)"}
    counts = [int((distances["distance_bucket"] == b).sum()) for b in sorted(set(distances["distance_bucket"]))]
    assert all(f"(n={c})" in rows["| dpo | trained (fixed subset)"] for c in counts)
    assert "< α = 0.05)" in rows["| dpo | trained (fixed subset)"]
    assert "≥ α = 0.05)" in rows["| dpop | trained (fixed subset)"]
    md, record = build_report("T", start, variants, tmp_path)
    assert "trained (fixed subset)" not in md and "trained_pairs_slope" not in record


def test_the_figures_alone_render_the_report_also_read_back_from_json(tmp_path: Path):
    """The renderer reads nothing but the figures: read back from JSON (NaN as null) they give the same Markdown
    and plots; a variant with no held-out pairs renders its empty row and n/a correlations."""
    rng = np.random.default_rng(2)
    start = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < 20 for i in range(40)]})
    empty = _variant(rng, 0.0, 20)
    empty.pairs = empty.pairs.head(0)
    figures = compute_report(start, {"dpo": _variant(rng, -1.0, 25), "none": empty}, {}, SETTINGS)
    md = render_report("T", figures, tmp_path / "memory")
    read_back = json.loads(json.dumps(json_safe(figures)))
    assert read_back != figures  # NaN became null on the way
    assert render_report("T", read_back, tmp_path / "json") == md
    pngs = sorted(p.name for p in (tmp_path / "memory").iterdir())
    assert pngs == ["accuracy.png", "displacement.png", "gradients.png", "logprobs.png", "loss.png", "squeezing.png"]
    for name in pngs:
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "json" / name).read_bytes(), name
    assert "| none | 0 | | | | | | | |" in md.splitlines()
    assert "| none | n/a | n/a | n/a | n/a | n/a |" in md.splitlines()
    # no pairs in common: no held-out comparison of the two
    assert set(findings_record(figures)) == {"settings", "variants", "accuracy_between", "predictors"}


def test_render_a_hand_written_figures_structure(tmp_path: Path):
    """Every cell of the report comes from its place in the figures, formatted as the report formats it."""

    def iv(estimate, low, high):
        return {"estimate": estimate, "low": low, "high": high, "level": 0.95}

    def test(name, p_value, n):
        return {"name": name, "p_value": p_value, "n": n}

    finding = {
        "variant": "dpo",
        "kind": "displacement",
        "fired": True,
        "text": "**likelihood displacement**: x.",
        "figures": {},
    }
    figures = {
        "settings": {"alpha": 0.05, "level": 0.9, "n_resamples": 100, "seed": 1, "drastic_drop_orders": 1.0},
        "names": ["dpo"],
        "data": {"pairs": {"scenario": 3, "n_train": 7}},
        "accuracy": {
            "n_test": 10,
            "start": iv(0.5, 0.2, 0.8),
            "between": [],
            "variants": {
                "dpo": {
                    "accuracy": iv(0.6, 0.3, 0.9),
                    "change": iv(0.1, -0.1, 0.3),
                    "only_before": 1,
                    "only_after": 2,
                    "mcnemar": test("exact McNemar", 1.0, 10),
                }
            },
        },
        "heldout": {
            "variants": {
                "dpo": {
                    "ref_w": -20.0,
                    "lp_w": -21.0,
                    "stats": {
                        "n": 4,
                        "delta_w": iv(-1.0, -1.5, -0.5),
                        "delta_w_median": iv(-0.9, -1.4, -0.4),
                        "delta_l": iv(-2.0, -2.5, -1.5),
                        "delta_l_median": iv(-2.1, -2.6, -1.6),
                        "below": iv(0.75, 0.3, 0.95),
                        "below_test": test("sign test", 0.625, 4),
                    },
                }
            },
            "between": [],
        },
        "distance": {
            "buckets": ["[0.00,0.50)", "[0.50,1.00]"],
            "trained_pairs_slope": {},
            "rows": [
                {
                    "variant": "dpo",
                    "pairs": "held-out",
                    "buckets": [{"mean": iv(-1.0, -1.5, -0.5), "n": 4}, {"mean": None, "n": 0}],
                    "slope": iv(None, None, None),
                    "test": test("t test of the slope", None, 4),
                }
            ],
        },
        "predictors": None,
        "curves": {"heldout": {"dpo": {}}, "train": {"dpo": {}}, "probe": {"dpo": {}}, "history": {}},
        "findings": {"dpo": [finding]},
    }
    md = render_report("Hand", figures, tmp_path)
    lines = md.splitlines()
    assert lines[0] == "# Hand" and "90 % interval" in lines[2] and "(100 resamples, seed 1)" in lines[2]
    assert "- pairs (scenario 3): 7 train, n/a held out; mean normalised edit distance n/a" in lines
    assert "- judge `?`: n/a groups kept, n/a dropped as ties, candidate accuracy 0%" in lines
    assert "| starting policy | 50.0% [20.0%, 80.0%] | | | |" in lines
    assert "| dpo | 60.0% [30.0%, 90.0%] | +10.0 pts [-10.0, +30.0] | 1 / 2 | 1 |" in lines
    assert (
        "| dpo | 4 | -20.00 → -21.00 | -1.00 [-1.50, -0.50] | -0.90 [-1.40, -0.40] | -2.00 [-2.50, -1.50] | "
        "-2.10 [-2.60, -1.60] | 75% [30%, 95%] | 0.62 |"
    ) in lines
    assert "| variant | pairs | [0.00,0.50) | [0.50,1.00] | slope |" in lines
    assert "| dpo | held-out | -1.00 [-1.50, -0.50] (n=4) | – | n/a (one edit distance) |" in lines
    assert md.endswith("\n- `dpo`: **likelihood displacement**: x.\n")
    assert not any(line.startswith(("### Which predicts", "## Training curves", "Loss on")) for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png"]
