"""Each finding fires on a synthetic effect and stays silent on synthetic noise of the same size."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from pipeline.analysis import findings

SETTINGS = findings.StatSettings(alpha=0.05, level=0.95, n_resamples=2000, seed=0, drastic_drop_orders=1.0)
N = 40


def _pairs(d_w, d_l=None, dist=None) -> pl.DataFrame:
    n = len(d_w)
    d_l = np.zeros(n) - 1.0 if d_l is None else d_l
    return pl.DataFrame(
        {
            "pair_id": [f"p{i:03d}" for i in range(n)],
            "ref_w": [-20.0] * n,
            "ref_l": [-25.0] * n,
            "lp_w": -20.0 + np.asarray(d_w),
            "lp_l": -25.0 + np.asarray(d_l),
            "len_w": [10] * n,
            "len_l": [10] * n,
            "edit_distance_norm": np.linspace(0.05, 0.95, n) if dist is None else dist,
            "distance_bucket": ["x"] * n,
        }
    )


def _displacement(variant: str, pairs: pl.DataFrame) -> findings.Finding:
    return findings.displacement_finding(variant, findings.heldout_stats(pairs, SETTINGS), SETTINGS)


def test_displacement_fires_on_an_effect_not_on_noise():
    rng = np.random.default_rng(0)
    effect = _displacement("dpo", _pairs(rng.normal(-1.0, 0.5, N), rng.normal(-2, 0.5, N)))
    assert effect.fired and "**likelihood displacement**" in effect.text and "both likelihoods fell" in effect.text
    assert effect.figures["delta_w"]["high"] < 0 and effect.figures["sign_test"]["p_value"] < 0.05
    noise = _displacement("dpo", _pairs(rng.normal(0.0, 1.0, N)))
    assert not noise.fired and "not significant at this size" in noise.text and "displacement**" not in noise.text
    assert noise.figures["delta_w"]["low"] < 0 < noise.figures["delta_w"]["high"]
    kept = _displacement("dpop", _pairs(rng.normal(0.8, 0.5, N)))
    assert not kept.fired and "rose above the reference" in kept.text
    # every finding prints its rule: level and alpha
    assert "α = 0.05" in noise.text and "[" in noise.text


def test_displacement_needs_both_the_interval_and_the_sign_test():
    # Most pairs a little above, a few far below: the mean is negative, but fewer than half fell.
    d = np.r_[np.full(30, 0.05), np.full(10, -3.0)]
    f = findings.displacement_finding("dpo", findings.heldout_stats(_pairs(d), SETTINGS), SETTINGS)
    assert f.figures["delta_w"]["high"] < 0 and not f.fired


def test_slope_of_delta_on_edit_distance():
    rng = np.random.default_rng(1)
    dist = rng.uniform(0, 1, 90)
    h = findings.heldout_stats(_pairs(-2.0 + 2.0 * dist + rng.normal(0, 0.3, 90), dist=dist), SETTINGS)
    assert h.slope.low > 0 and h.slope_test.rejects(0.05)
    assert h.slope.low < 2.0 < h.slope.high


def test_accuracy_finding_by_mcnemar():
    before = np.array([True] * 30 + [False] * 30)
    after = before.copy()
    after[30:50] = True  # 20 prompts fixed
    after[:2] = False  # 2 broken
    _, up = findings.accuracy_finding("dpo", before, after, SETTINGS)
    assert up.fired and "**test accuracy rose**" in up.text and up.figures["only_after"] == 20
    noisy = before.copy()
    noisy[30:33], noisy[:3] = True, False  # 3 each way
    _, same = findings.accuracy_finding("dpo", before, noisy, SETTINGS)
    assert not same.fired and "not significant at this size" in same.text
    with pytest.raises(ValueError, match="different test prompts"):
        findings.correctness_pairs(
            pl.DataFrame({"prompt_id": ["a"], "correct": [True]}),
            pl.DataFrame({"prompt_id": ["b"], "correct": [True]}),
            "x",
        )


def _curves(steps, heldout_fn, train_fn=None, ratio_fn=None) -> pl.DataFrame:
    rows = []
    for k, st in enumerate(steps):
        for which, fn in (("heldout", heldout_fn), ("train", train_fn or heldout_fn)):
            d_w = fn(k)
            ratio = ratio_fn(k) if ratio_fn else np.zeros(N)
            for i in range(N):
                rows.append(
                    {
                        "step": st,
                        "set": which,
                        "pair_id": f"p{i:03d}",
                        "lp_w": -20.0 + d_w[i],
                        "lp_l": -25.0,
                        "ref_w": -20.0,
                        "ref_l": -25.0,
                        "len_w": 10,
                        "len_l": 10,
                        "log10_grad_ratio": float(ratio[i]),
                    }
                )
    return pl.DataFrame(rows)


def test_drastic_drop_fires_when_the_ratio_grows_by_orders_of_magnitude():
    rng = np.random.default_rng(2)
    grow = _curves([0, 4, 8], lambda k: np.zeros(N), ratio_fn=lambda k: k * 1.0 + rng.normal(0, 0.2, N))
    f = findings.drastic_drop_finding("dpo", grow, SETTINGS)
    assert f.fired and "**drastic drop**" in f.text and f.figures["median_change"]["estimate"] > 1.5
    small = _curves([0, 4, 8], lambda k: np.zeros(N), ratio_fn=lambda k: k * 0.2 + rng.normal(0, 0.05, N))
    assert not findings.drastic_drop_finding("dpo", small, SETTINGS).fired  # significant, below the printed threshold
    noise = _curves([0, 4, 8], lambda k: np.zeros(N), ratio_fn=lambda k: rng.normal(0, 1.0, N))
    f = findings.drastic_drop_finding("dpo", noise, SETTINGS)
    assert not f.fired and "threshold is 1 order" in f.text
    assert "not tested" in findings.drastic_drop_finding("dpo", None, SETTINGS).text


def test_degradation_chooses_the_peak_on_train_and_tests_on_heldout():
    rng = np.random.default_rng(3)
    shape = [0.0, 0.6, 1.0, 0.4, -0.3]  # rises, then falls below where it started
    up_down = _curves(range(0, 20, 4), lambda k: shape[k] + rng.normal(0, 0.2, N))
    f = findings.degradation_finding("dpo", up_down, SETTINGS)
    assert f.fired and f.figures["peak_step"] == 8 and "**degradation**" in f.text
    flat_after = _curves(
        range(0, 20, 4),
        lambda k: (shape[k] if k <= 2 else 1.0) + rng.normal(0, 0.4, N),
        train_fn=lambda k: np.full(N, shape[k]),
    )
    f = findings.degradation_finding("dpo", flat_after, SETTINGS)
    assert not f.fired and "not significant at this size" in f.text
    rising = _curves(range(0, 20, 4), lambda k: np.full(N, 0.2 * k))
    assert "no interior peak" in findings.degradation_finding("dpo", rising, SETTINGS).text


def test_squeezing_needs_the_probe_to_rise_while_both_sides_fall():
    rng = np.random.default_rng(4)
    fell = findings.heldout_stats(_pairs(rng.normal(-1, 0.3, N), rng.normal(-2, 0.3, N)), SETTINGS)

    def probe(change):
        return pl.DataFrame(
            [
                {"step": st, "probe": f"q{i}", "greedy_lp": -5.0 + (change[i] if st else 0.0), "n_tokens": 20}
                for st in (0, 8)
                for i in range(len(change))
            ]
        )

    assert findings.squeezing_finding("dpo", probe(rng.normal(1.0, 0.3, 16)), fell, SETTINGS).fired
    noise = findings.squeezing_finding("dpo", probe(rng.normal(0.0, 1.0, 16)), fell, SETTINGS)
    assert not noise.fired and "did not rise significantly" in noise.text
    rose = findings.heldout_stats(_pairs(rng.normal(1, 0.3, N), rng.normal(-2, 0.3, N)), SETTINGS)
    kept = findings.squeezing_finding("dpop", probe(rng.normal(1.0, 0.3, 16)), rose, SETTINGS)
    assert not kept.fired and "did not both fall" in kept.text


def test_json_safe_turns_nan_into_null():
    assert findings.json_safe({"a": [float("nan"), 1.0], "b": (float("inf"),)}) == {"a": [None, 1.0], "b": [None]}
