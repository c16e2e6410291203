"""Preference training and the SFT warm-up on a tiny random model with SmolLM2's real tokenizer."""


import pytest
import torch
from repo_utils import repo_params

from pipeline.config import TrainSettings, WarmupParams
from pipeline.model import loading
from pipeline.model.logprobs import batched_logprobs, encode_prompt, encode_response
from pipeline.training import distributed as D
from pipeline.training import losses
from pipeline.training.batching import step_batches
from pipeline.training.sft import train_sft
from pipeline.training.trainer import (
    Checkpointing,
    PairExample,
    micro_batches,
    train_preference,
)


def train_settings(**overrides) -> TrainSettings:
    """The repository's train settings (shared by the variants) with ``overrides``."""
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    return TrainSettings(**{**base, **overrides})


def warmup_settings(**overrides) -> WarmupParams:
    return WarmupParams(**{**repo_params()["policy"]["warmup"], **overrides})


def test_step_batches_cover_every_pair_each_epoch():
    steps = step_batches(10, 4, 2, seed=0)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) and steps[:3] != steps[3:]


def test_micro_batches_split_each_ranks_share():
    idx = [5, 3, 8, 1, 0, 9, 2]
    assert micro_batches(idx, D.Context(), 3) == [[5, 1, 2], [3, 0], [8, 9]]
    ranks = [micro_batches(idx, D.Context(rank=r, world=2), 2) for r in range(2)]
    assert ranks == [[[5, 0], [8, 2]], [[3, 9], [1]]]
    assert sorted(i for r in ranks for mb in r for i in mb) == sorted(idx)


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
    hist = train_preference(model, ex, terms, s, pad_id=tok.pad_token_id, progress=None)
    assert hist[0]["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-4)
    assert hist[-1]["margin"] > hist[0]["margin"] + 0.1 and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["accuracy"] >= 0.5


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir):
    tok = loading.load_tokenizer(tiny_model_dir)
    results = []
    for accum in (1, 3):
        model = loading.load_model(tiny_model_dir, "float32")
        ex = _examples(model, tok)
        s = train_settings(lr=1e-3, epochs=1, batch_size=6, grad_accum=accum, max_length=64, seed=0)
        hist = train_preference(model, ex, [("dpop", 1.0, {"beta": 0.5, "dpop_lambda": 5.0})], s,
                                pad_id=tok.pad_token_id, progress=None)
        results.append((hist[0]["loss"], next(model.parameters()).detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_resume_from_a_checkpoint_continues_the_same_run(tiny_model_dir, tmp_path):
    """In process: a rerun finds the last checkpoint, re-logs its history and ends where the first run ended."""
    tok = loading.load_tokenizer(tiny_model_dir)
    s = train_settings(lr=1e-3, epochs=2, batch_size=3, max_length=64, seed=0)  # 4 steps
    ck = Checkpointing(str(tmp_path / "run.pt"), every=3, key="k")
    runs = []
    for _ in range(2):
        model = loading.load_model(tiny_model_dir, "float32")
        logged = []
        hist = train_preference(model, _examples(model, tok), [("dpo", 1.0, {"beta": 0.5})], s,
                                pad_id=tok.pad_token_id, progress=None, checkpoint=ck,
                                log_fn=lambda i, m: logged.append(i))
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
    step_losses = train_sft(model, prompts, responses, warmup_settings(epochs=5, lr=1e-3, batch_size=4),
                            pad_id=tok.pad_token_id, progress=None)
    assert len(step_losses) == 5 and step_losses[-1] < step_losses[0]
