"""Preference training and the SFT warm-up on a tiny random model with SmolLM2's real tokenizer."""

import math
import re

import polars as pl
import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading, precision
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import batched_logprobs, pair_logprobs
from pipeline.settings.policy import WarmupParams
from pipeline.settings.train import TrainSettings
from pipeline.training import distributed, losses
from pipeline.training.batching import step_batches
from pipeline.training.checkpoints import Checkpointing
from pipeline.training.diagnostics import preference_metrics
from pipeline.training.evaluation import Evaluation, FixedSets, Probe, due
from pipeline.training.examples import PairExample, pair_examples
from pipeline.training.sft import train_sft
from pipeline.training.trainer import RunOptions, check_step, micro_batches, train_preference

REF_CHECK_TOL = repo_params()["train"]["ref_check_tol"]


def train_settings(**overrides) -> TrainSettings:
    """The repository's train settings (shared by the variants) with ``overrides``; fp32 unless a test
    asks for bf16: most tests here compare with log-probs computed by hand in fp32, and bf16 autocast
    is on by default on CPUs with native bf16 (the bf16 tests below set it)."""
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    return TrainSettings(**{**base, "bf16": False, **overrides})


def warmup_settings(**overrides) -> WarmupParams:
    return WarmupParams(**{**repo_params()["policy"]["warmup"], "bf16": False, **overrides})


def test_step_batches_cover_every_pair_each_epoch():
    steps = step_batches(10, 4, 2, seed=0)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) and steps[:3] != steps[3:]


def test_step_batches_drop_the_short_tail_of_each_epoch():
    steps = step_batches(10, 4, 2, seed=0, drop_tail=True)
    assert [len(s) for s in steps] == [4, 4, 4, 4]  # every step the same size
    assert len(set(steps[0] + steps[1])) == 8 and set(steps[0] + steps[1]) != set(steps[2] + steps[3])
    assert [sorted(s) for s in step_batches(3, 4, 2, seed=0, drop_tail=True)] == [[0, 1, 2]] * 2  # fewer than a batch


def test_fixed_sets_start_at_the_reference_and_are_scored_every_k_steps(tiny_model_dir):
    """Fixed sets and the probe are scored before the first update (equal to the reference there), every
    ``every`` steps and after the last step, on the same pairs; the logged metrics are their means."""
    model = loading.load_model(tiny_model_dir, "float32")
    tok = loading.load_tokenizer(tiny_model_dir)
    ex = _examples(model, tok, 7)
    ids = [f"p{i}" for i in range(7)]
    fixed = FixedSets({"heldout": (ids[5:], ex[5:]), "train": (ids[:3], ex[:3])}, every=2, batch_size=2)
    probe = Probe(("What is 1 + 1?", "What is 2 + 3?"), 2, 4, ("a", "b"))
    evaluation, logged = Evaluation(fixed, probe, tok), {}
    s = train_settings(lr=1e-3, epochs=2, batch_size=2, grad_accum=1, max_length=64, seed=0, tail="drop")
    run = RunOptions(log_fn=lambda step, m: logged.setdefault(step, m), evaluation=evaluation)
    hist = train_preference(model, ex[:5], [("dpo", 1.0, {"beta": 0.5})], s, pad_id=tok.pad_token_id, run=run)
    curves = evaluation.curves
    assert len(hist) == 4  # 5 pairs in steps of 2: the fifth dropped each epoch
    rows = pl.DataFrame(curves.fixed)
    assert sorted(set(rows["step"])) == [0, 2, 4] and sorted(set(logged)) == [0, 1, 2, 3, 4]
    first = rows.filter(pl.col("step") == 0)
    assert sorted(first["pair_id"]) == ["p0", "p1", "p2", "p5", "p6"]
    assert (first["lp_w"] - first["ref_w"]).abs().max() < 1e-4 and (first["lp_l"] - first["ref_l"]).abs().max() < 1e-4
    # DPO's two sides have equal |∂ℓ/∂log π|, so the ratio w.r.t. the probabilities is π(y_w)/π(y_l)
    expect = (first["lp_w"] - first["lp_l"]) / math.log(10)
    assert (first["log10_grad_ratio"] - expect).abs().max() < 1e-4
    last = rows.filter((pl.col("step") == 4) & (pl.col("set") == "train"))
    margin = lambda d: ((d["lp_w"] - d["ref_w"]) - (d["lp_l"] - d["ref_l"])).mean()  # noqa: E731
    assert margin(last) > margin(first.filter(pl.col("set") == "train")) + 0.01
    assert logged[4].keys() == {k for k in logged[4] if k.startswith(("fixed_", "probe_"))}  # after the last step
    assert logged[0]["fixed_heldout_delta_w"] == pytest.approx(0.0, abs=1e-4) and "fixed_train_lp_w" in logged[2]
    assert "fixed_heldout_lp_w" not in logged[1]
    assert [(r["step"], r["probe"]) for r in curves.probe] == [(st, q) for st in (0, 2, 4) for q in ("a", "b")]
    assert logged[0]["probe_greedy_lp"] == pytest.approx(
        (curves.probe[0]["greedy_lp"] + curves.probe[1]["greedy_lp"]) / 2
    )


def test_a_fixed_set_without_pairs_is_left_out(tiny_model_dir):
    """No held-out pairs (pairs.heldout_fraction 0): the held-out set is dropped by FixedSets itself, so
    training scores only the training subset instead of failing on an empty batch (as in the slow
    multi-process tests, whose pairs are all training pairs)."""
    model = loading.load_model(tiny_model_dir, "float32")
    tok = loading.load_tokenizer(tiny_model_dir)
    ex = _examples(model, tok, 4)
    fixed = FixedSets({"heldout": ([], []), "train": (["p0", "p1"], ex[:2])}, every=1, batch_size=2)
    assert set(fixed.sets) == {"train"}
    evaluation, logged = Evaluation(fixed), {}
    s = train_settings(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_length=64, seed=0, tail="drop")
    train_preference(
        model,
        ex,
        [("dpo", 1.0, {"beta": 0.5})],
        s,
        pad_id=tok.pad_token_id,
        run=RunOptions(log_fn=lambda step, m: logged.setdefault(step, m), evaluation=evaluation),
    )
    curves = evaluation.curves
    assert {r["set"] for r in curves.fixed} == {"train"} and {r["step"] for r in curves.fixed} == {0, 1, 2}
    assert not any(k.startswith("fixed_heldout") for m in logged.values() for k in m)
    assert FixedSets({"heldout": ([], []), "train": ([], [])}, every=1, batch_size=2).sets == {}


def test_evaluations_are_due_at_the_start_every_k_steps_and_after_the_last():
    assert [s for s in range(6) if due(2, s, 5)] == [0, 2, 4, 5]
    assert [s for s in range(5) if due(2, s, 4)] == [0, 2, 4]  # the last is also a multiple of k: once
    assert not any(due(0, s, 5) for s in range(6))  # every 0: never
    with pytest.raises(ValueError, match="tokenizer"):
        Evaluation(probe=Probe(("What is 1 + 1?",), 1, 4))


def test_micro_batches_split_each_ranks_share():
    idx = [5, 3, 8, 1, 0, 9, 2]
    assert micro_batches(idx, distributed.Context(), 3) == [
        ([5, 1, 2], [True] * 3),
        ([3, 0], [True] * 2),
        ([8, 9], [True] * 2),
    ]
    ranks = [micro_batches(idx, distributed.Context(rank=r, world=2), 2) for r in range(2)]
    assert [[mb for mb, _ in r] for r in ranks] == [[[5, 0], [8, 2]], [[3, 9], [1]]]
    assert all(all(real) for r in ranks for _, real in r)


@pytest.mark.parametrize(
    ("n", "world", "grad_accum"),
    [
        (2, 8, 1),  # a tail of 2 pairs on 8 processes (e.g. 58 pairs in steps of 8)
        (2, 3, 1),
        (2, 4, 2),
        (5, 3, 2),
        (7, 2, 3),
        (1, 1, 4),
        (8, 8, 1),
        (12, 3, 2),
    ],
)
def test_micro_batches_give_every_rank_the_same_number_of_nonempty_parts(n, world, grad_accum):
    """Every rank runs ``grad_accum`` micro-batches of at least one row (so all take part in every
    collective); every real pair of the step appears once; padding only fills an otherwise empty
    part, as one masked copy of a pair of the step."""
    idx = [3 * i + 1 for i in range(n)][::-1]
    ranks = [micro_batches(idx, distributed.Context(rank=r, world=world), grad_accum) for r in range(world)]
    assert all(len(r) == grad_accum for r in ranks)
    assert sorted(i for r in ranks for mb, real in r for i, k in zip(mb, real) if k) == sorted(idx)
    for r in ranks:
        for mb, real in r:
            assert len(mb) == len(real) >= 1
            assert all(real) or (real == [False] and mb[0] in idx)
    if n >= world * grad_accum:
        assert all(all(real) for r in ranks for _, real in r)  # no padding when every part has a pair


def _examples(model, tok, n=6):
    ex = []
    for i in range(n):
        p = encode_prompt(tok, f"What is {i} + {i}?")
        w, l_ = encode_response(tok, f"Answer: {2 * i}"), encode_response(tok, f"Answer: {2 * i + 1}")
        (rw, rl), _ = batched_logprobs(model, [p, p], [w, l_], tok.pad_token_id, 2)
        ex.append(PairExample(tuple(p), tuple(w), tuple(l_), rw, rl))
    return ex


def test_dpo_training_raises_the_margin(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32")
    tok = loading.load_tokenizer(tiny_model_dir)
    ex = _examples(model, tok)
    terms = [("dpo", 1.0, {"beta": 0.5})]
    s = train_settings(lr=1e-3, epochs=6, batch_size=6, grad_accum=1, max_length=64, seed=0)
    hist = train_preference(model, ex, terms, s, pad_id=tok.pad_token_id)
    assert hist[0]["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-4)
    assert hist[-1]["delta_margin"] > hist[0]["delta_margin"] + 0.1 and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["reward_margin"] == pytest.approx(0.5 * hist[-1]["delta_margin"], rel=1e-5)
    assert hist[-1]["accuracy"] == 1.0  # every pair ranked right once trained

    # accuracy is the share of pairs with Δw > Δl. References set against the trained policy's own log-probs
    # (scored outside the trainer) give each pair a chosen Δw, Δl; the first step's figures are the policy's as
    # it is (the ref check is off: it is no longer the reference). Δw > Δl in 4 of 6 pairs, Δw > 0 in 2 of 6.
    deltas = [(-2.0, -3.0), (-1.0, -4.0), (1.0, -1.0), (-0.5, -1.0), (2.0, 3.0), (-1.0, 1.0)]
    placed = []
    for e, (d_w, d_l) in zip(ex, deltas):
        (lp_w, lp_l), _ = batched_logprobs(
            model, [e.prompt_ids] * 2, [e.chosen_ids, e.rejected_ids], tok.pad_token_id, 2
        )
        placed.append(PairExample(e.prompt_ids, e.chosen_ids, e.rejected_ids, lp_w - d_w, lp_l - d_l))
    first = train_preference(
        model,
        placed,
        terms,
        train_settings(lr=1e-3, epochs=1, batch_size=6, grad_accum=1, max_length=64, seed=0, ref_check_tol=1e9),
        pad_id=tok.pad_token_id,
    )[0]
    assert first["accuracy"] == pytest.approx(4 / 6)
    # mean of Δw − Δl: (1 + 3 + 2 + 0.5 − 1 − 2) / 6
    assert first["delta_margin"] == pytest.approx(3.5 / 6, abs=1e-4)


# Offsets of the references from the policy's own log-probs: Δw, Δl at the first step (before any update).
OFF_W, OFF_L = [0.3, -0.2, 0.5, 0.1], [-0.4, 0.2, -0.1, -0.6]


@pytest.mark.parametrize(
    "terms,rewards",
    [
        ([("gamma_dpo", 1.0, {"beta": 0.5, "gamma": 0.1})], None),  # σ(β(lp_w − lp_l) − γ(ref_w − ref_l)): no β·Δ
        ([("ipo", 1.0, {"tau": 0.25})], None),  # τ sets the target margin, Δw − Δl is IPO's margin itself
        ([("flex_dpo", 1.0, {"beta_w": 0.5, "beta_l": 0.1})], (0.5, 0.1)),
        ([("dpo", 1.0, {"beta": 0.3})], (0.3, 0.3)),
        ([("dpo", 1.0, {"beta": 0.3}), ("gamma_dpo", 1.0, {"beta": 0.3, "gamma": 0.3})], None),
    ],
)
def test_logged_margins_are_what_their_names_say(tiny_model_dir, terms, rewards):
    """delta_margin is the unscaled Δw − Δl for every loss; reward_* only where the loss has the
    implicit reward β·Δ, and then with its own β_w, β_l (not the first term's β)."""
    model = loading.load_model(tiny_model_dir, "float32")
    tok = loading.load_tokenizer(tiny_model_dir)
    ex = [
        PairExample(e.prompt_ids, e.chosen_ids, e.rejected_ids, e.ref_w - ow, e.ref_l - ol)
        for e, ow, ol in zip(_examples(model, tok, 4), OFF_W, OFF_L)
    ]
    # The offsets would fail the first-step check on purpose, so it is widened here.
    s = train_settings(lr=1e-3, epochs=1, batch_size=4, max_length=64, ref_check_tol=10.0)
    m = train_preference(model, ex, terms, s, pad_id=tok.pad_token_id)[0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert m["delta_w"] == pytest.approx(mean(OFF_W), abs=1e-4)
    if rewards is None:
        assert not {"reward_w", "reward_l", "reward_margin"} & m.keys()
    else:
        b_w, b_l = rewards
        assert m["reward_w"] == pytest.approx(b_w * mean(OFF_W), abs=1e-4)
        assert m["reward_l"] == pytest.approx(b_l * mean(OFF_L), abs=1e-4)
        assert m["reward_margin"] == pytest.approx(b_w * mean(OFF_W) - b_l * mean(OFF_L), abs=1e-4)
    assert m["delta_margin"] == pytest.approx(mean(OFF_W) - mean(OFF_L), abs=1e-4)
    assert "margin" not in m  # a name that says neither which margin nor which β


def _pairs(tok, n: int) -> pl.DataFrame:
    """Pairs of varied lengths, so the reference stage's batches (sorted by length, chosen and rejected
    apart) and training's (chosen and rejected of one step together) have other shapes and padding."""
    rows = []
    for i in range(n):
        p = encode_prompt(tok, f"What is {i} + {3 * i}?" + " Be brief." * (i % 3))
        rows.append(
            {
                "prompt_ids": p,
                "chosen_ids": encode_response(tok, "So" + " then" * (2 * i % 5) + f" {4 * i}"),
                "rejected_ids": encode_response(tok, f"It is {4 * i + 1}" + ", surely" * (i % 4)),
            }
        )
    return pl.DataFrame(rows)


def _first_step_check(tiny_model_dir, ref_bf16: bool, train_bf16: bool, tol: float = REF_CHECK_TOL):
    """References as the reference stage computes them, then training with ``train_bf16``."""
    model = loading.load_model(tiny_model_dir, "float32").eval()
    tok = loading.load_tokenizer(tiny_model_dir)
    pairs = _pairs(tok, 8)
    params = repo_params()
    reference = train_settings(max_length=params["reference"]["max_length"], bf16=ref_bf16)
    rw, rl, _, _ = pair_logprobs(model, pairs, tok.pad_token_id, params["reference"]["batch_size"], reference)
    ex = pair_examples(pairs.with_columns(ref_w=pl.Series(rw), ref_l=pl.Series(rl)))
    s = train_settings(lr=1e-3, epochs=1, batch_size=4, grad_accum=2, bf16=train_bf16, ref_check_tol=tol)
    return train_preference(model, ex, [("dpo", 1.0, {"beta": 0.1})], s, pad_id=tok.pad_token_id)


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    """train.bf16 autocasts on CPU too, as it does on a GPU."""
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))


# The tiny random model's logits are small, and so is its bf16 rounding: two bf16 computations of this
# batch agree, bf16 and fp32 differ by about 1.3e-4 nats per token (9e-4 per sequence). The check reads
# the gap per token; this tolerance lies between the two.
TINY_TOL = 2e-5


@pytest.mark.parametrize("tol", [REF_CHECK_TOL, TINY_TOL])
def test_first_step_passes_when_reference_and_training_share_the_precision(tiny_model_dir, bf16_on_cpu, tol):
    hist = _first_step_check(tiny_model_dir, ref_bf16=True, train_bf16=True, tol=tol)
    assert hist[0]["ref_gap_per_token"] <= tol and hist[0]["ref_gap_mean"] <= hist[0]["ref_gap_max"]
    assert "ref_gap_lp" not in hist[0]  # the worst sequence's numbers are for the error message only


def test_first_step_fails_on_an_fp32_reference_with_bf16_training(tiny_model_dir, bf16_on_cpu):
    with pytest.raises(ValueError, match=r"above train\.ref_check_tol = 2e-05") as err:
        _first_step_check(tiny_model_dir, ref_bf16=False, train_bf16=True, tol=TINY_TOL)
    msg = str(err.value)
    per_token = float(re.search(r"by (\S+) nats per token", msg).group(1))
    mean, gap = (float(x) for x in re.search(r"\((\S+) nats per sequence on average, max (\S+);", msg).groups())
    lp, ref = (float(x) for x in re.search(r"worst sequence: lp (\S+), ref (\S+)\)", msg).groups())
    assert TINY_TOL < per_token < mean <= gap
    assert abs(lp - ref) == pytest.approx(gap, abs=2e-4)  # the message's pair is the worst one


def test_first_step_at_the_default_tolerance_refuses_another_models_reference(tiny_model_dir, other_tiny_model_dir):
    """Even two tiny random models, whose near-uniform logits make every sequence score about alike, lie
    further apart per token (about 0.028 nats) than params' tolerance."""
    model = loading.load_model(tiny_model_dir, "float32")
    other = loading.load_model(other_tiny_model_dir, "float32").eval()
    tok = loading.load_tokenizer(tiny_model_dir)
    pairs = _pairs(tok, 8)
    rw, rl, _, _ = pair_logprobs(other, pairs, tok.pad_token_id, 4, train_settings(max_length=256))
    ex = pair_examples(pairs.with_columns(ref_w=pl.Series(rw), ref_l=pl.Series(rl)))
    s = train_settings(lr=1e-3, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match=r"nats per token, above train\.ref_check_tol = 0\.02 "):
        train_preference(model, ex, [("dpo", 1.0, {"beta": 0.1})], s, pad_id=tok.pad_token_id)


@pytest.mark.parametrize(("tokens", "fails"), [(500, False), (10, True)])
def test_the_first_step_gap_is_read_per_token(tokens, fails):
    """A gap of 0.1 nats on every sequence is rounding spread over 500 tokens, but 0.01 nats a token on 10."""
    lp = torch.full((4,), -2.0 * tokens, dtype=torch.float64)
    n = torch.full((4,), float(tokens), dtype=torch.float64)
    metrics = {"loss": 0.7, **preference_metrics(lp + 0.1, lp - 0.1, lp, lp, n, n, None)}
    assert metrics["ref_gap_mean"] == pytest.approx(0.1) and metrics["ref_gap_per_token"] == pytest.approx(0.1 / tokens)
    if fails:
        with pytest.raises(ValueError, match="first step"):
            check_step(metrics, 0, tol=0.005)
    else:
        check_step(metrics, 0, tol=0.005)
    check_step({**metrics, "ref_gap_lp": 0.0, "ref_gap_ref": 0.0}, 1, tol=0.005)  # later steps are not checked


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir):
    tok = loading.load_tokenizer(tiny_model_dir)
    results = []
    for accum in (1, 3, 8):  # 8 > 6 pairs: two micro-batches of padding, weight 0
        model = loading.load_model(tiny_model_dir, "float32")
        ex = _examples(model, tok)
        s = train_settings(lr=1e-3, epochs=1, batch_size=6, grad_accum=accum, max_length=64, seed=0)
        hist = train_preference(
            model, ex, [("dpop", 1.0, {"beta": 0.5, "dpop_lambda": 5.0})], s, pad_id=tok.pad_token_id
        )
        results.append((hist[0], next(model.parameters()).detach().clone()))
    for metrics, weights in results[1:]:
        assert metrics["loss"] == pytest.approx(results[0][0]["loss"], abs=1e-5)
        # Padding rows reach no diagnostic (the means would move towards the copied pair's). Accuracy
        # and displaced share compare Δ's that are rounding noise before the first update: left out.
        continuous = [k for k in metrics if not k.startswith(("accuracy", "displaced_share"))]
        assert metrics.keys() == results[0][0].keys()
        assert {k: metrics[k] for k in continuous} == pytest.approx(
            {k: results[0][0][k] for k in continuous}, rel=1e-4, abs=1e-5
        )
        assert torch.allclose(results[0][1], weights, atol=1e-6)


def test_shared_prompt_layout_trains_as_the_padded_one(tiny_model_dir):
    """train.shared_prompt only changes how a pair is laid out: the same losses, diagnostics and weights
    over several steps (the prompts differ in length, so rows are padded differently)."""
    tok = loading.load_tokenizer(tiny_model_dir)
    runs = {}
    for shared in (False, True):
        model = loading.load_model(tiny_model_dir, "float32")
        ex = _examples(model, tok)
        s = train_settings(lr=1e-3, epochs=3, batch_size=3, grad_accum=1, max_length=64, seed=0, shared_prompt=shared)
        hist = train_preference(
            model, ex, [("dpop", 1.0, {"beta": 0.5, "dpop_lambda": 5.0})], s, pad_id=tok.pad_token_id
        )
        runs[shared] = hist, torch.cat([p.detach().flatten() for p in model.parameters()])
    (h0, w0), (h1, w1) = runs[False], runs[True]
    assert len(h0) == len(h1) == 6
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h0], abs=1e-5)
    assert [h["delta_w"] for h in h1] == pytest.approx([h["delta_w"] for h in h0], abs=1e-4)
    assert h0[-1]["delta_w"] != pytest.approx(h0[0]["delta_w"], abs=1e-2)  # it did train
    assert torch.allclose(w1, w0, atol=1e-5)


def test_resume_from_a_checkpoint_continues_the_same_run(tiny_model_dir, tmp_path):
    """In process: a rerun finds the last checkpoint, re-logs its history and ends where the first run ended."""
    tok = loading.load_tokenizer(tiny_model_dir)
    s = train_settings(lr=1e-3, epochs=2, batch_size=3, max_length=64, seed=0)  # 4 steps
    ck = Checkpointing(str(tmp_path / "run.pt"), every=3, key="k")
    runs = []
    for _ in range(2):
        model = loading.load_model(tiny_model_dir, "float32")
        logged = []
        hist = train_preference(
            model,
            _examples(model, tok),
            [("dpo", 1.0, {"beta": 0.5})],
            s,
            pad_id=tok.pad_token_id,
            run=RunOptions(log_fn=lambda i, m, logged=logged: logged.append(i), checkpoint=ck),
        )
        runs.append((hist, logged, next(model.parameters()).detach().clone()))
        assert torch.load(ck.path, weights_only=False)["step"] == 3  # none after the last step
    (h1, log1, w1), (h2, log2, w2) = runs
    assert log1 == log2 == [0, 1, 2, 3] and h1 == h2 and torch.equal(w1, w2)
    assert Checkpointing(ck.path, every=3, key="other").load() is None  # another run's checkpoint


def test_loss_registry_is_what_training_calls():
    lp_w, lp_l, ref_w, ref_l = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))
    per = losses.combined_loss([("dpo", 1.0, {"beta": 1.0})], lp_w, lp_l, ref_w, ref_l)
    assert per.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())


def test_sft_warmup_lowers_the_nll(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32")
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts = [encode_prompt(tok, f"What is {i} + 1?") for i in range(4)]
    responses = [encode_response(tok, f"Answer: {i + 1}") for i in range(4)]
    step_losses = train_sft(
        model,
        prompts,
        responses,
        warmup_settings(epochs=5, lr=1e-3, batch_size=4),
        pad_id=tok.pad_token_id,
        progress=None,
    )
    assert len(step_losses) == 5 and step_losses[-1] < step_losses[0]


def test_sft_warmup_autocasts_where_bf16_applies(tiny_model_dir, monkeypatch):
    """policy.warmup.bf16: the warm-up's forward under bf16 autocast where train.bf16 would use it; the
    weights stay fp32."""
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts = [encode_prompt(tok, f"What is {i} + 1?") for i in range(4)]
    responses = [encode_response(tok, f"Answer: {i + 1}") for i in range(4)]

    def first_loss(bf16: bool) -> float:
        model = loading.load_model(tiny_model_dir, "float32")
        out = train_sft(
            model,
            prompts,
            responses,
            warmup_settings(epochs=1, lr=1e-3, batch_size=4, bf16=bf16),
            pad_id=tok.pad_token_id,
            progress=None,
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return out[0]

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    fp32, bf16 = first_loss(False), first_loss(True)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=1e-2)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert first_loss(True) == fp32  # no native bf16: fp32 whatever the setting
