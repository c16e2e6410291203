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
    run_toy,
    sft,
    target_distribution,
)
from pipeline.config import ToyParams
from pipeline.training import losses as L

CLAIM_LOSSES = ("dpo", "dpop", "dpo_sft", "ipo")


def toy_params(**overrides) -> ToyParams:
    """params.yaml's toy section with ``overrides`` merged in."""
    return ToyParams(**repo_params({"toy": overrides})["toy"])


@pytest.fixture(scope="module")
def params() -> ToyParams:
    # the default toy settings, restricted to the losses and the scenario the claims are about
    return toy_params(losses=CLAIM_LOSSES, scenarios=(1,))


@pytest.fixture(scope="module")
def hist(params) -> pl.DataFrame:
    return run_toy(params)


def series(df: pl.DataFrame, loss: str, scenario: int = 1) -> dict[str, np.ndarray]:
    d = df.filter((pl.col("loss") == loss) & (pl.col("scenario") == scenario)).sort("step")
    return {c: d[c].to_numpy() for c in d.columns if c not in ("loss", "scenario")}


def test_history_shape(hist, params):
    assert hist.columns == list(HISTORY_COLUMNS)
    assert hist.height == len(CLAIM_LOSSES) * (params.steps + 1)
    assert hist["step"].min() == 0 and hist["step"].max() == params.steps
    for c in ("p_chosen", "p_rejected", "p_dispersed"):
        assert hist[c].is_between(0.0, 1.0).all()


def test_sft_fits_the_initial_distribution(params, hist):
    init = params.scenario_init[1]
    model, kl = sft(params, init)
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
    a = make_pairs(toy_params(seed=3, pairs_per_prompt=3))
    b = make_pairs(toy_params(seed=3, pairs_per_prompt=3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
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
    model, _ = sft(params, params.scenario_init[1])
    prompt, chosen, rejected = make_pairs(params)
    with torch.no_grad():
        probs = torch.softmax(model(torch.eye(4, dtype=torch.float64)), -1)
    for loss in CLAIM_LOSSES:
        p = probs.clone().requires_grad_(True)
        lp = p.log()
        lp_w, lp_l = lp[prompt, chosen], lp[prompt, rejected]
        ones = torch.ones_like(lp_w)
        out = L.preference_loss(loss, lp_w, lp_l, lp_w.detach(), lp_l.detach(), ones, ones,
                                **params.hparams[loss]).mean()
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
