"""Hand-computed values, sign facts and config validation for pipeline.training.losses."""

from __future__ import annotations

import math
import warnings
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from pipeline.training import losses
from pipeline.training.losses import (
    LossConfigError,
    combined_loss,
    preference_loss,
    validate_hparams,
)

# Two pairs, float64 so hand-computed values match to ~1e-12.
LP_W = [-2.0, -5.0]
LP_L = [-3.0, -1.5]
REF_W = [-2.5, -4.0]
REF_L = [-2.0, -2.0]
LEN_W = [4.0, 2.0]
LEN_L = [3.0, 5.0]


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def inputs():
    return t(LP_W), t(LP_L), t(REF_W), t(REF_L)


def lens():
    return t(LEN_W), t(LEN_L)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(x: float) -> float:  # -log σ(x)
    return -math.log(sig(x))


def rows():
    return list(zip(LP_W, LP_L, REF_W, REF_L, LEN_W, LEN_L))


def check(name: str, expected: list[float], **hp):
    lw, ll = lens()
    got = preference_loss(name, *inputs(), lw, ll, **hp)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def trl_cpo_trainer():
    """TRL's CPO trainer class (optional: the ``bench`` extra installs TRL)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that its API may change
        return pytest.importorskip("trl.experimental.cpo.cpo_trainer").CPOTrainer


def trl_cpo_loss(loss_type: str, chosen, rejected, *, beta: float, label_smoothing: float, simpo_gamma: float = 0.0):
    """TRL's ``CPOTrainer.cpo_loss`` on tensors: it reads only these settings of the trainer, so a stand-in
    for ``self`` calls it without building one (a model, a tokenizer and a dataset)."""
    settings = SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        accelerator=SimpleNamespace(device="cpu"),
    )
    losses, _, _ = trl_cpo_trainer().cpo_loss(settings, chosen, rejected)
    return losses


# --------------------------------------------------------------------------------------------- values
def test_dpo_values():
    b = 0.5
    exp = [nls(b * ((win - ref_win) - (lose - ref_lose))) for win, lose, ref_win, ref_lose, *_ in rows()]
    # pair 0: Δw = 0.5, Δl = -1.0 -> -log σ(0.75)
    assert exp[0] == pytest.approx(-math.log(1 / (1 + math.exp(-0.75))))
    check("dpo", exp, beta=b)


def test_cdpo_values():
    # β = 0.5, ε = 0.2; d = Δw − Δl. pair 0: d = (−2 + 2.5) − (−3 + 2) = 1.5, β d = 0.75:
    #   0.8 · (−log σ(0.75)) + 0.2 · (−log σ(−0.75)) = 0.8 · 0.386871 + 0.2 · 1.136871 = 0.536871
    # pair 1: d = (−5 + 4) − (−1.5 + 2) = −1.5, β d = −0.75:
    #   0.8 · (−log σ(−0.75)) + 0.2 · (−log σ(0.75)) = 0.8 · 1.136871 + 0.2 · 0.386871 = 0.986871
    check(
        "cdpo", [0.8 * nls(0.75) + 0.2 * nls(-0.75), 0.8 * nls(-0.75) + 0.2 * nls(0.75)], beta=0.5, label_smoothing=0.2
    )


def test_cdpo_is_dpo_plus_a_term_linear_in_the_smoothing():
    # −log σ(−z) = −log σ(z) + z, so −(1−ε) log σ(z) − ε log σ(−z) = −log σ(z) + ε z: cdpo − dpo = ε β d,
    # here 0.2 · (±0.75) = ±0.15 (β d from test_cdpo_values)
    cdpo = preference_loss("cdpo", *inputs(), beta=0.5, label_smoothing=0.2)
    dpo = preference_loss("dpo", *inputs(), beta=0.5)
    assert (cdpo - dpo).tolist() == pytest.approx([0.15, -0.15], rel=1e-10)


def test_cdpo_matches_trl():
    # TRL's DPOTrainer computes its losses inside the trainer from a model's forward pass (and in TRL 1.16 its
    # "sigmoid" loss no longer reads label_smoothing); CPO's conservative sigmoid loss is the same expression
    # on a margin, −(1−ε) log σ(β m) − ε log σ(−β m), m = chosen − rejected: given Δw and Δl it is TRL's cDPO.
    lp_w, lp_l, ref_w, ref_l = inputs()
    expected = trl_cpo_loss("sigmoid", lp_w - ref_w, lp_l - ref_l, beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(preference_loss("cdpo", *inputs(), beta=0.5, label_smoothing=0.2), expected)


def test_cdpo_zero_smoothing_is_dpo():
    a = preference_loss("cdpo", *inputs(), beta=0.3, label_smoothing=0.0)
    b = preference_loss("dpo", *inputs(), beta=0.3)
    torch.testing.assert_close(a, b)


def test_dpop_values():
    b, lam = 0.5, 5.0
    exp = []
    for win, lose, ref_win, ref_lose, *_ in rows():
        pen = max(0.0, ref_win - win)
        exp.append(nls(b * ((win - ref_win) - (lose - ref_lose) - lam * pen)))
    # pair 0 has lp_w > ref_w (no penalty), pair 1 lp_w < ref_w (penalty 1.0)
    assert exp[1] == pytest.approx(nls(0.5 * ((-1.0) - 0.5 - 5.0)))
    check("dpop", exp, beta=b, dpop_lambda=lam)


def test_ipo_values():
    tau = 0.25
    exp = [((win - ref_win) - (lose - ref_lose) - 1 / (2 * tau)) ** 2 for win, lose, ref_win, ref_lose, *_ in rows()]
    assert exp[0] == pytest.approx((1.5 - 2.0) ** 2)
    check("ipo", exp, tau=tau)


def test_slic_values():
    delta, reg = 2.0, 0.1
    exp = [max(0.0, delta - (win - lose)) - reg * win for win, lose, *_ in rows()]
    # pair 0: margin 1 -> hinge 1 ; +0.2 ; pair 1: margin -3.5 -> 5.5 ; +0.5
    assert exp == pytest.approx([1.2, 6.0])
    check("slic", exp, delta=delta, reg_weight=reg)


def test_slic_and_simpo_run_without_reference():
    lp_w, lp_l, _, _ = inputs()
    lw, ll = lens()
    preference_loss("slic", lp_w, lp_l, None, None, delta=1.0, reg_weight=0.0)
    preference_loss("simpo", lp_w, lp_l, None, None, lw, ll, beta=1.0, margin=0.5)
    assert not losses.needs_reference("slic") and not losses.needs_reference("simpo")
    assert losses.needs_reference("dpo")
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", lp_w, lp_l, None, None, beta=0.1)


def test_flex_dpo_values():
    # β_w = 0.5, β_l = 0.1; pair 0: Δw = 0.5, Δl = −1.0: 0.5 · 0.5 − 0.1 · (−1.0) = 0.35 -> 0.533382
    #                       pair 1: Δw = −1.0, Δl = 0.5: 0.5 · (−1.0) − 0.1 · 0.5 = −0.55 -> 1.005492
    check("flex_dpo", [nls(0.35), nls(-0.55)], beta_w=0.5, beta_l=0.1)


def test_flex_dpo_with_one_beta_is_dpo():
    for beta in (0.05, 0.1, 1.0):
        a = preference_loss("flex_dpo", *inputs(), beta_w=beta, beta_l=beta)
        b = preference_loss("dpo", *inputs(), beta=beta)
        torch.testing.assert_close(a, b)


def test_dpo_sft_values():
    b, a = 0.5, 2.0
    exp = [
        nls(b * ((win - ref_win) - (lose - ref_lose))) + a * (-win / n_win)
        for win, lose, ref_win, ref_lose, n_win, _ in rows()
    ]
    assert exp[0] == pytest.approx(nls(0.75) + 2.0 * 0.5)
    check("dpo_sft", exp, beta=b, sft_weight=a)


def test_gamma_dpo_values():
    # β = 0.5, γ = 0.2. pair 0: lp_w − lp_l = −2 + 3 = 1, ref_w − ref_l = −2.5 + 2 = −0.5:
    #   0.5 · 1 − 0.2 · (−0.5) = 0.6 -> 0.437488
    # pair 1: lp_w − lp_l = −5 + 1.5 = −3.5, ref_w − ref_l = −4 + 2 = −2:
    #   0.5 · (−3.5) − 0.2 · (−2) = −1.35 -> 1.580509
    check("gamma_dpo", [nls(0.6), nls(-1.35)], beta=0.5, gamma=0.2)


def test_gamma_dpo_with_gamma_zero_ignores_the_reference_and_matches_trl():
    # γ = 0 leaves −log σ(β (lp_w − lp_l)): the reference may be anything, and it is TRL's CPO "sigmoid" loss
    lp_w, lp_l, ref_w, ref_l = inputs()
    a = preference_loss("gamma_dpo", lp_w, lp_l, ref_w, ref_l, beta=0.5, gamma=0.0)
    b = preference_loss("gamma_dpo", lp_w, lp_l, ref_w + t([3.0, -7.0]), ref_l - 1.0, beta=0.5, gamma=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, trl_cpo_loss("sigmoid", lp_w, lp_l, beta=0.5, label_smoothing=0.0))


def test_hinge_values():
    b, g = 1.0, 2.0
    exp = [max(0.0, g * (ref_win - ref_lose) - b * (win - lose)) for win, lose, ref_win, ref_lose, *_ in rows()]
    # both margins met: pair 0: 2*(-0.5) - 1 = -2 -> 0 ; pair 1: 2*(-2) - (-3.5) = -0.5 -> 0
    check("hinge", exp, beta=b, gamma=g)
    b, g = 2.0, 0.5
    exp = [max(0.0, g * (ref_win - ref_lose) - b * (win - lose)) for win, lose, ref_win, ref_lose, *_ in rows()]
    assert exp == pytest.approx([0.0, 6.0])
    check("hinge", exp, beta=b, gamma=g)


def test_simpo_values():
    # β = 2, margin 0.5. pair 0: lp_w/|y_w| = −2/4 = −0.5, lp_l/|y_l| = −3/3 = −1: 2 · 0.5 − 0.5 = 0.5 -> 0.474077
    # pair 1: −5/2 = −2.5, −1.5/5 = −0.3: 2 · (−2.2) − 0.5 = −4.9 -> 4.907419
    check("simpo", [nls(0.5), nls(-4.9)], beta=2.0, margin=0.5)


def test_simpo_normalises_by_length_and_ignores_the_reference():
    lp_w, lp_l, ref_w, ref_l = inputs()
    lw, ll = lens()
    hp = {"beta": 2.0, "margin": 0.5}
    base = preference_loss("simpo", lp_w, lp_l, ref_w, ref_l, lw, ll, **hp)
    # a response k times as long with k times the summed log-prob has the same per-token log-prob
    torch.testing.assert_close(preference_loss("simpo", 3 * lp_w, lp_l, None, None, 3 * lw, ll, **hp), base)
    torch.testing.assert_close(preference_loss("simpo", lp_w, 5 * lp_l, None, None, lw, 5 * ll, **hp), base)
    # the same summed log-prob over twice the tokens is a better per-token log-prob (the sums are negative)
    assert torch.all(preference_loss("simpo", lp_w, lp_l, None, None, 2 * lw, ll, **hp) < base)


def test_simpo_matches_trl():
    # TRL's SimPO is CPO's "simpo" loss on the per-token mean log-probs (get_batch_logps' average_log_prob):
    # on random logits, chosen responses of 4 and 2 tokens and rejected ones of 3 and 1 (prompt and padding
    # masked), TRL's own averaging and loss against ours on its summed log-probs and the token counts
    cpo = trl_cpo_trainer()
    logits = torch.randn(4, 7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100  # prompt
    labels[0, 6:], labels[1, 4:], labels[2, 5:], labels[3, 3:] = -100, -100, -100, -100  # padding
    sums = cpo.get_batch_logps(logits, labels.clone(), average_log_prob=False)
    means = cpo.get_batch_logps(logits, labels.clone(), average_log_prob=True)
    n_tokens = (labels[:, 1:] != -100).sum(-1).to(torch.float64)
    assert n_tokens.tolist() == [4, 2, 3, 1]
    expected = trl_cpo_loss("simpo", means[:2], means[2:], beta=2.0, label_smoothing=0.0, simpo_gamma=0.5)
    got = preference_loss("simpo", sums[:2], sums[2:], None, None, n_tokens[:2], n_tokens[2:], beta=2.0, margin=0.5)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["dpo_sft", "simpo"])
def test_length_losses_need_lengths(name):
    hp = {"dpo_sft": {"beta": 0.1, "sft_weight": 1.0}, "simpo": {"beta": 1.0, "margin": 0.0}}[name]
    assert losses.needs_lengths(name)
    with pytest.raises(ValueError, match="len_w"):
        preference_loss(name, *inputs(), **hp)
    with pytest.raises(ValueError, match="len_w"):
        preference_loss(name, *inputs(), t(LEN_W), None, **hp)


def test_registry_complete():
    assert set(losses.LOSS_NAMES) == {
        "dpo",
        "cdpo",
        "dpop",
        "ipo",
        "slic",
        "flex_dpo",
        "dpo_sft",
        "gamma_dpo",
        "hinge",
        "simpo",
    }
    assert [n for n in losses.LOSS_NAMES if losses.needs_lengths(n)] == ["dpo_sft", "simpo"]
    for spec in losses.LOSSES.values():
        assert spec.fn.__doc__ and "`" in spec.fn.__doc__


# --------------------------------------------------------------------------------------------- sign facts
def test_dpop_penalty_zero_while_above_reference():
    lp_w = t([-1.0, -2.0, -3.0])
    ref_w = t([-1.0, -2.5, -4.0])  # lp_w >= ref_w everywhere
    lp_l, ref_l = t([-2.0, -1.0, -0.5]), t([-1.5, -1.5, -1.5])
    for lam in (5.0, 50.0, 500.0):
        a = preference_loss("dpop", lp_w, lp_l, ref_w, ref_l, beta=0.1, dpop_lambda=lam)
        b = preference_loss("dpo", lp_w, lp_l, ref_w, ref_l, beta=0.1)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and it does bite below the reference
    below = preference_loss("dpop", ref_w - 1.0, lp_l, ref_w, ref_l, beta=0.1, dpop_lambda=50.0)
    plain = preference_loss("dpo", ref_w - 1.0, lp_l, ref_w, ref_l, beta=0.1)
    assert torch.all(below > plain)


def test_dpop_gradient_pushes_chosen_up_below_reference():
    # lp_w < ref_w and the rejected side already far down: DPO's own push on lp_w is tiny.
    lp_w = t([-3.0, -10.0], grad=True)
    ref_w, lp_l, ref_l = t([-2.0, -4.0]), t([-20.0, -30.0]), t([-2.0, -3.0])
    loss = preference_loss("dpop", lp_w, lp_l, ref_w, ref_l, beta=0.1, dpop_lambda=50.0).sum()
    (g,) = torch.autograd.grad(loss, lp_w)
    assert torch.all(g < 0)
    # analytic: dL/dlp_w = -β(1+λ) σ(-z)
    for i in range(2):
        w, rw, ll, rl = lp_w[i].item(), ref_w[i].item(), lp_l[i].item(), ref_l[i].item()
        z = 0.1 * ((w - rw) - (ll - rl) - 50.0 * (rw - w))
        assert g[i].item() == pytest.approx(-0.1 * 51.0 * sig(-z), rel=1e-9)


def test_gamma_dpo_with_gamma_equal_beta_is_dpo():
    for beta in (0.05, 0.1, 1.0):
        a = preference_loss("gamma_dpo", *inputs(), beta=beta, gamma=beta)
        b = preference_loss("dpo", *inputs(), beta=beta)
        torch.testing.assert_close(a, b)


def test_hinge_zero_when_margin_met():
    lp_w, lp_l = t([-1.0, -1.0]), t([-3.0, -1.5])
    ref_w, ref_l = t([-2.0, -2.0]), t([-2.5, -2.2])
    # margin needed: (γ/β)(ref_w - ref_l) = 0.5 and 0.2; margins achieved 2.0 and 0.5
    out = preference_loss("hinge", lp_w, lp_l, ref_w, ref_l, beta=1.0, gamma=1.0)
    assert out.tolist() == [0.0, 0.0]
    lp_w = t([-1.0], grad=True)
    out = preference_loss("hinge", lp_w, t([-3.0]), t([-2.0]), t([-2.5]), beta=1.0, gamma=1.0)
    (g,) = torch.autograd.grad(out.sum(), lp_w)
    assert g.item() == 0.0


def test_dpo_gradient_matches_analytic():
    beta = 0.3
    lp_w, lp_l = t(LP_W, grad=True), t(LP_L, grad=True)
    ref_w, ref_l = t(REF_W), t(REF_L)
    loss = preference_loss("dpo", lp_w, lp_l, ref_w, ref_l, beta=beta).sum()
    gw, gl = torch.autograd.grad(loss, (lp_w, lp_l))
    for i, (win, lose, ref_win, ref_lose, *_) in enumerate(rows()):
        m = (win - ref_win) - (lose - ref_lose)
        assert gw[i].item() == pytest.approx(-beta * sig(-beta * m), rel=1e-12)
        assert gl[i].item() == pytest.approx(beta * sig(-beta * m), rel=1e-12)


def test_dpo_numerically_stable_for_large_margins():
    big = preference_loss("dpo", t([0.0]), t([-1e4]), t([0.0]), t([0.0]), beta=1.0)
    small = preference_loss("dpo", t([-1e4]), t([0.0]), t([0.0]), t([0.0]), beta=1.0)
    assert big.item() == pytest.approx(0.0, abs=1e-300)
    assert small.item() == pytest.approx(1e4)
    assert torch.isfinite(big).all() and torch.isfinite(small).all()


# --------------------------------------------------------------------------------------------- validation
def test_validate_unknown_name():
    with pytest.raises(LossConfigError) as e:
        validate_hparams("dpoo", {"beta": 0.1})
    assert e.value.key is None
    assert "dpoo" in str(e.value) and "dpo" in str(e.value) and "simpo" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(LossConfigError):
        preference_loss("nope", *inputs(), beta=0.1)


def test_validate_unknown_key():
    with pytest.raises(LossConfigError) as e:
        validate_hparams("dpo", {"beta": 0.1, "lambda": 3})
    assert e.value.key == "lambda"
    assert "lambda" in str(e.value) and "unknown" in str(e.value)


def test_validate_missing_key():
    with pytest.raises(LossConfigError) as e:
        validate_hparams("dpop", {"beta": 0.1})
    assert e.value.key == "dpop_lambda"
    assert "missing" in str(e.value) and "dpop_lambda" in str(e.value)


@pytest.mark.parametrize("bad", ["0.1", None, [0.1]])
def test_validate_wrong_type(bad):
    with pytest.raises(LossConfigError) as e:
        validate_hparams("ipo", {"tau": bad})
    assert e.value.key == "tau"
    assert "must be a number" in str(e.value)


def test_validate_bool_rejected():
    with pytest.raises(LossConfigError) as e:
        validate_hparams("cdpo", {"beta": 0.1, "label_smoothing": True})
    assert e.value.key == "label_smoothing"
    assert "must be a number" in str(e.value)


@pytest.mark.parametrize(
    "name,hp,key",
    [
        ("dpo", {"beta": 0.0}, "beta"),
        ("dpo", {"beta": -1}, "beta"),
        ("dpo", {"beta": float("nan")}, "beta"),
        ("ipo", {"tau": 0}, "tau"),
        ("flex_dpo", {"beta_w": 0.1, "beta_l": 0.0}, "beta_l"),
        ("cdpo", {"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ("cdpo", {"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
        ("dpop", {"beta": 0.1, "dpop_lambda": -5}, "dpop_lambda"),
        ("dpo_sft", {"beta": 0.1, "sft_weight": -1.0}, "sft_weight"),
        ("slic", {"delta": -1.0, "reg_weight": 0.0}, "delta"),
        ("slic", {"delta": 1.0, "reg_weight": -0.1}, "reg_weight"),
        ("gamma_dpo", {"beta": 0.1, "gamma": -0.1}, "gamma"),
        ("simpo", {"beta": 1.0, "margin": -0.5}, "margin"),
    ],
)
def test_validate_out_of_range(name, hp, key):
    with pytest.raises(LossConfigError) as e:
        validate_hparams(name, hp)
    assert e.value.key == key
    assert key in str(e.value) and "must be" in str(e.value)


def test_validate_returns_floats_and_accepts_boundaries():
    out = validate_hparams("cdpo", {"beta": 1, "label_smoothing": 0})
    assert out == {"beta": 1.0, "label_smoothing": 0.0}
    assert all(type(v) is float for v in out.values())
    assert validate_hparams("dpop", {"beta": 0.1, "dpop_lambda": 0}) == {"beta": 0.1, "dpop_lambda": 0.0}


def test_preference_loss_validates():
    with pytest.raises(LossConfigError) as e:
        preference_loss("dpo", *inputs(), beta=0.1, gamma=1.0)
    assert e.value.key == "gamma"


# --------------------------------------------------------------------------------------------- combined
def test_combined_loss_weighted_sum_tuples_and_objects():
    lw, ll = lens()
    Term = namedtuple("Term", "name weight hp")

    class Obj:
        def __init__(self, name, weight, hp):
            self.name, self.weight, self.hp = name, weight, hp

    spec = [("dpo", 1.0, {"beta": 0.1}), ("ipo", 0.5, {"tau": 0.25}), ("simpo", 2.0, {"beta": 1.0, "margin": 0.3})]
    expected = sum(w * preference_loss(n, *inputs(), lw, ll, **hp) for n, w, hp in spec)
    for terms in (spec, [Term(*s) for s in spec], [Obj(*s) for s in spec]):
        got = combined_loss(terms, *inputs(), lw, ll)
        assert got.shape == (2,)
        torch.testing.assert_close(got, expected)
    # and by hand for the first pair
    win, lose, ref_win, ref_lose, n_win, n_lose = rows()[0]
    d = (win - ref_win) - (lose - ref_lose)
    by_hand = nls(0.1 * d) + 0.5 * (d - 2.0) ** 2 + 2.0 * nls(1.0 * (win / n_win - lose / n_lose) - 0.3)
    assert got[0].item() == pytest.approx(by_hand, rel=1e-10)


def test_combined_loss_errors():
    with pytest.raises(ValueError):
        combined_loss([], *inputs())
    with pytest.raises(LossConfigError) as e:
        combined_loss([("dpo", 1.0, {"beta": -1})], *inputs())
    assert e.value.key == "beta"


def test_registry_matches_the_typed_config():
    """One registry: every loss of pipeline.training.loss_hparams.LOSS_HPARAMS has a function whose keyword-only
    arguments are exactly its hyperparameters, a docstring with the formula's paper, and no other loss."""
    import inspect

    from pipeline.training.loss_hparams import LOSS_HPARAMS, LOSS_NAMES
    from pipeline.training.losses import LOSSES

    assert tuple(LOSSES) == LOSS_NAMES == tuple(LOSS_HPARAMS)
    for name, spec in LOSSES.items():
        kw = [p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert kw == list(LOSS_HPARAMS[name]) == list(spec.hparams), name
        doc = spec.fn.__doc__ or ""
        assert "``" in doc and ("arXiv" in doc or "blog" in doc or "note" in doc), name
