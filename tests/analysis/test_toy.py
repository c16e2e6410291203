"""The toy model of the 3D-properties paper (Yan et al. 2024, arXiv 2406.07327, §3.2): the qualitative
claims, checked on the default parameters (params.yaml's `toy:` section)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError
from repo_utils import repo_params

from pipeline.analysis.toy import (
    CHOSEN,
    HISTORY_COLUMNS,
    REJECTED,
    make_pairs,
    run_one,
    run_toy,
    sft,
    target_distribution,
)
from pipeline.analysis.toy_report import final_metrics
from pipeline.analysis.toy_settings import ToyParams
from pipeline.training.losses import preference_loss

CLAIM_LOSSES = ("dpo", "dpop", "dpo_sft", "ipo")


def toy_params(**overrides) -> ToyParams:
    """params.yaml's toy section with ``overrides`` merged in."""
    return ToyParams(**repo_params({"toy": overrides})["toy"])


@pytest.fixture(scope="module")
def params() -> ToyParams:
    # the default toy settings, restricted to the losses and the scenario the claims are about, one seed
    return toy_params(losses=CLAIM_LOSSES, scenarios=(1,), seeds=(0,))


@pytest.fixture(scope="module")
def hist(params) -> pl.DataFrame:
    return run_toy(params)


def series(df: pl.DataFrame, loss: str, scenario: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    d = df.filter((pl.col("loss") == loss) & (pl.col("scenario") == scenario) & (pl.col("seed") == seed)).sort("step")
    return {c: d[c].to_numpy() for c in d.columns if c not in ("loss", "scenario", "seed")}


def test_history_shape(hist, params):
    assert hist.columns == list(HISTORY_COLUMNS)
    assert hist.height == len(CLAIM_LOSSES) * (params.steps + 1)
    assert hist["step"].min() == 0 and hist["step"].max() == params.steps
    for c in ("p_chosen", "p_rejected", "p_dispersed"):
        assert hist[c].is_between(0.0, 1.0).all()


def test_sft_fits_the_initial_distribution(params, hist):
    init = params.scenario_init[1]
    model, kl = sft(params, init, 0)
    assert kl < 1e-6
    with torch.no_grad():
        p = torch.softmax(model(torch.eye(4, dtype=torch.float64)), -1)
    torch.testing.assert_close(p, target_distribution(init), atol=1e-4, rtol=0)
    s = series(hist, "dpo")
    assert s["p_chosen"][0] == pytest.approx(init.p_chosen, abs=1e-4)
    assert s["p_rejected"][0] == pytest.approx(init.p_rejected, abs=1e-4)
    # dispersed: 2 unseen + 3 other prompts' chosen responses
    assert s["p_dispersed"][0] == pytest.approx(1 - init.p_chosen - 4 * init.p_rejected, abs=1e-4)


def test_pairs_are_seeded_and_valid():
    a = make_pairs(toy_params(pairs_per_prompt=3), 3)
    b = make_pairs(toy_params(pairs_per_prompt=3), 3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[2], make_pairs(toy_params(pairs_per_prompt=3), 4)[2])
    prompt, chosen, rejected = a
    assert torch.equal(chosen, prompt) and set(chosen.tolist()) == set(CHOSEN)
    assert set(rejected.tolist()) <= set(REJECTED)


def test_dpo_3d_properties_in_scenario_1(hist):
    s = series(hist, "dpo")
    pc, pr, pd = s["p_chosen"], s["p_rejected"], s["p_dispersed"]
    peak = int(pc.argmax())
    # the chosen probability rises a lot first ...
    assert pc[peak] > pc[0] + 0.5
    assert 0 < peak < len(pc) - 50
    # ... then falls (degradation) ...
    assert pc[-1] < pc[peak] - 0.2
    # ... while the rejected one drastically drops to ~0 ...
    assert pr[-1] < 1e-6 and pr[-1] < pr[peak]
    # ... and the mass disperses to responses in neither set
    assert pd[-1] > pd[peak] + 0.2
    assert pd[-1] > pd[0]


def test_regularised_losses_keep_chosen_higher_than_dpo(hist):
    dpo_final = series(hist, "dpo")["p_chosen"][-1]
    for loss in ("dpop", "dpo_sft", "ipo"):
        final = series(hist, loss)["p_chosen"][-1]
        assert final > dpo_final + 0.2, (loss, final, dpo_final)


def test_dpop_keeps_chosen_at_or_above_reference(hist):
    pc = series(hist, "dpop")["p_chosen"]
    assert (pc[1:] >= pc[0] - 1e-9).all()


def test_dpo_gradient_ratio_equals_probability_ratio(hist):
    s = series(hist, "dpo")
    np.testing.assert_allclose(s["grad_ratio"], s["prob_ratio"], rtol=1e-6)
    # at the start every prompt is alike, so it is also p_chosen / p_rejected
    assert s["grad_ratio"][0] == pytest.approx(s["p_chosen"][0] / s["p_rejected"][0], rel=1e-3)


def test_gradient_ratio_grows_as_rejected_falls(hist):
    for loss in ("dpo", "dpop"):
        s = series(hist, loss)
        ratio, pr = s["grad_ratio"], s["p_rejected"]
        assert ratio[-1] > 1e6 * ratio[0]
        # rank correlation over the run: the lower π(y_l), the larger the ratio
        rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
        rho = np.corrcoef(rank(ratio), rank(pr))[0, 1]
        assert rho < -0.9, (loss, rho)


def test_probability_gradients_match_leaf_autograd(params, hist):
    """At step 0, recompute |∂L/∂π| with the probabilities themselves as the autograd leaf."""
    model, _ = sft(params, params.scenario_init[1], 0)
    prompt, chosen, rejected = make_pairs(params, 0)
    with torch.no_grad():
        probs = torch.softmax(model(torch.eye(4, dtype=torch.float64)), -1)
    for loss in CLAIM_LOSSES:
        p = probs.clone().requires_grad_(True)
        lp = p.log()
        lp_w, lp_l = lp[prompt, chosen], lp[prompt, rejected]
        ones = torch.ones_like(lp_w)
        out = preference_loss(loss, lp_w, lp_l, lp_w.detach(), lp_l.detach(), ones, ones, **params.hparams[loss]).mean()
        (g,) = torch.autograd.grad(out, p)
        gw, gl = g[prompt, chosen].abs(), g[prompt, rejected].abs()
        s = series(hist, loss)
        assert s["grad_w"][0] == pytest.approx(gw.mean().item(), rel=1e-6)
        assert s["grad_l"][0] == pytest.approx(gl.mean().item(), rel=1e-6)
        assert s["grad_ratio"][0] == pytest.approx((gl / gw).mean().item(), rel=1e-6)
    # DPO at the reference: |∂L/∂π_w| = β σ(0) / (B π_w)
    beta, n = params.hparams["dpo"]["beta"], len(prompt)
    pw = probs[prompt, chosen]
    assert series(hist, "dpo")["grad_w"][0] == pytest.approx((beta * 0.5 / n / pw).mean().item(), rel=1e-6)


def test_params_validation():
    with pytest.raises(ValidationError, match="unknown loss"):
        toy_params(losses=("dpo", "nope"))
    with pytest.raises(ValidationError, match=r"hparams\.dpop\.dpop_lambda"):
        toy_params(hparams={"dpop": {"beta": 0.1, "dpop_lambda": -1}})
    with pytest.raises(ValidationError, match="scenario_init"):
        toy_params(scenarios=(1, 5))
    with pytest.raises(ValidationError):
        toy_params(stepz=3)
    with pytest.raises(ValidationError):
        toy_params(scenario_init={1: {"p_chosen": 0.6, "p_rejected": 0.2}})  # mass > 1
    p = toy_params(hparams={"dpo": {"beta": 1}})
    assert p.hparams["dpo"] == {"beta": 1} and p.hparams["ipo"] == repo_params()["toy"]["hparams"]["ipo"]
    with pytest.raises(ValidationError, match=r"hparams\.cdpo: missing"):  # no hidden defaults
        ToyParams(**{**repo_params()["toy"], "hparams": {"dpo": {"beta": 1}}})


def test_stacked_runs_follow_their_one_at_a_time_trajectories():
    """run_toy trains every seed x scenario x loss at once; each run must be the run it would be alone."""
    p = toy_params(
        steps=80,
        sft_steps=60,
        seeds=(0, 5),
        scenarios=(1, 2, 4),
        losses=("dpo", "dpop", "ipo", "hinge", "simpo", "slic"),
    )
    df = run_toy(p)
    assert df.height == 2 * 3 * 6 * 81
    for seed, scenario, loss in ((0, 1, "dpo"), (5, 2, "dpop"), (5, 4, "hinge"), (0, 4, "simpo"), (5, 1, "slic")):
        model, _ = sft(p, p.scenario_init[scenario], seed)
        alone = run_one(p, loss, model, make_pairs(p, seed))
        got = series(df, loss, scenario, seed)
        for k in ("p_chosen", "p_rejected", "p_dispersed", "grad_w", "grad_l"):
            np.testing.assert_allclose(
                got[k], alone[k].numpy(), rtol=1e-9, atol=1e-300, err_msg=f"{seed} {scenario} {loss} {k}"
            )
    # the seeds are different runs
    assert not np.allclose(series(df, "dpo", 1, 0)["p_chosen"], series(df, "dpo", 1, 5)["p_chosen"])


def test_metrics_over_seeds_give_changes_from_the_initial_values():
    from scipy import stats

    p = toy_params(steps=120, sft_steps=150, seeds=(0, 1, 2, 3), scenarios=(1,), losses=("dpo", "dpop"))
    df = run_toy(p)
    m = final_metrics(df, 0.9)["dpo"]["scenario_1"]
    runs = [series(df, "dpo", 1, s) for s in p.seeds]
    init = np.array([r["p_chosen"][0] for r in runs])
    final = np.array([r["p_chosen"][-1] for r in runs])
    change = final - init
    assert m["seeds"] == 4
    assert m["p_chosen_init"] == pytest.approx(init.mean()) and m["p_chosen"] == pytest.approx(final.mean())
    assert m["p_chosen_peak"] == pytest.approx(np.mean([r["p_chosen"].max() for r in runs]))
    assert m["p_chosen_change"] == pytest.approx(change.mean()) and m["p_chosen_sd"] == pytest.approx(final.std(ddof=1))
    # the 90 % t interval of the mean change, from the t quantile by hand
    half = stats.t.ppf(0.95, 3) * change.std(ddof=1) / 2
    assert (m["p_chosen_change_lo"], m["p_chosen_change_hi"]) == pytest.approx(
        (change.mean() - half, change.mean() + half)
    )
    assert m["p_chosen_rose"] == int((change > 0).sum()) and m["p_chosen_fell"] == int((change < 0).sum())
    # DPO drives the rejected probability down in every seed, significantly
    assert m["p_rejected_fell"] == 4 and m["p_rejected_change_hi"] < 0 and m["p_rejected_change_p"] < 0.01
    one = final_metrics(df.filter(pl.col("seed") == 0), 0.9)["dpo"]["scenario_1"]
    assert one["seeds"] == 1 and one["p_chosen_change_lo"] is None and one["p_chosen_sd"] is None
