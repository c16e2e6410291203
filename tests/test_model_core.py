"""Log-probs, sampling and training on a tiny random model with SmolLM2's real tokenizer."""

import pytest
import torch

from pipeline.training import losses
from pipeline.model import loading
from pipeline.model.logprobs import batched_logprobs, collate, encode_prompt, encode_response, reference_check, sequence_logprobs
from pipeline.generation.sampling import GenerationSettings, TransformersSampler
from pipeline.training.trainer import PairExample, step_batches, train_preference


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return loading.load_model(tiny_model_dir).eval(), loading.load_tokenizer(tiny_model_dir)


def test_response_only_logprobs_match_full_logits(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, "What is 2 + 2?"), encode_prompt(tok, "Hi")]
    responses = [encode_response(tok, "4"), encode_response(tok, "Hello there, friend")]
    ids, att, resp = collate(prompts, responses, tok.pad_token_id)
    got, counts = sequence_logprobs(model, ids, att, resp)
    want = reference_check(model, ids, att, resp)
    assert torch.allclose(got, want, atol=1e-4)
    assert counts.tolist() == [len(r) for r in responses]
    # Padding must not change a row's value: score the rows one at a time.
    for i in range(2):
        s, _ = sequence_logprobs(model, *collate([prompts[i]], [responses[i]], tok.pad_token_id))
        assert s.item() == pytest.approx(got[i].item(), abs=1e-4)


def test_truncation_keeps_the_response():
    ids, att, resp = collate([[1] * 50], [[7, 8, 9]], pad_id=0, max_length=20)
    assert ids.shape[1] == 20 and resp.sum().item() == 3 and ids[0, -3:].tolist() == [7, 8, 9]


def test_sampler_is_deterministic_and_logprobs_are_the_policys(tiny):
    model, tok = tiny
    s = TransformersSampler.from_model(model, tok, "tiny", batch_size=4)
    prompts = ["What is 1 + 1?", "Name a colour.", "Count to three."]
    settings = GenerationSettings(n=3, temperature=1.0, max_new_tokens=6, seed=5)
    a = s.generate(prompts, settings, progress=None)
    b = s.generate(prompts, settings, progress=None)
    c = s.generate(prompts, GenerationSettings(n=3, temperature=1.0, max_new_tokens=6, seed=6), progress=None)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3, 3]
    flat = [(p, cand) for p, cands in zip(prompts, a) for cand in cands]
    tf, _ = batched_logprobs(model, [encode_prompt(tok, p) for p, _ in flat], [list(c.token_ids) for _, c in flat],
                             tok.pad_token_id)
    for (_, cand), lp in zip(flat, tf):
        assert cand.logprob_sum == pytest.approx(lp, abs=1e-3)
        assert cand.finish_reason in ("stop", "length")
        assert (cand.token_ids[-1] == tok.eos_token_id) == (cand.finish_reason == "stop")


def test_step_batches_cover_every_pair_each_epoch():
    steps = step_batches(10, 4, 2, seed=0)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(steps[:3], [])) == list(range(10)) and steps[:3] != steps[3:]


def _examples(model, tok, n=6):
    ex = []
    for i in range(n):
        p = encode_prompt(tok, f"What is {i} + {i}?")
        w, l_ = encode_response(tok, f"Answer: {2 * i}"), encode_response(tok, f"Answer: {2 * i + 1}")
        (rw, rl), _ = batched_logprobs(model, [p, p], [w, l_], tok.pad_token_id)
        ex.append(PairExample(tuple(p), tuple(w), tuple(l_), rw, rl))
    return ex


def test_dpo_training_raises_the_margin(tiny_model_dir):
    model = loading.load_model(tiny_model_dir)
    tok = loading.load_tokenizer(tiny_model_dir)
    ex = _examples(model, tok)
    terms = [("dpo", 1.0, {"beta": 0.5})]
    hist = train_preference(model, ex, terms, lr=1e-3, epochs=6, batch_size=6, grad_accum=1, max_length=64, seed=0,
                            pad_id=tok.pad_token_id, progress=None)
    assert hist[0]["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-4)
    assert hist[-1]["margin"] > hist[0]["margin"] + 0.1 and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["accuracy"] >= 0.5


def test_grad_accumulation_matches_one_big_batch(tiny_model_dir):
    tok = loading.load_tokenizer(tiny_model_dir)
    results = []
    for accum in (1, 3):
        model = loading.load_model(tiny_model_dir)
        ex = _examples(model, tok)
        hist = train_preference(model, ex, [("dpop", 1.0, {"beta": 0.5, "dpop_lambda": 5.0})], lr=1e-3, epochs=1,
                                batch_size=6, grad_accum=accum, max_length=64, seed=0, pad_id=tok.pad_token_id,
                                progress=None)
        results.append((hist[0]["loss"], next(model.parameters()).detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_loss_registry_is_what_training_calls():
    lp_w, lp_l, ref_w, ref_l = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))
    per = losses.combined_loss([("dpo", 1.0, {"beta": 1.0})], lp_w, lp_l, ref_w, ref_l)
    assert per.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(1.0)).item())


def test_builtin_conversion_runs_once_under_concurrent_callers(tmp_path, monkeypatch):
    """Parallel experiments (or test workers) on a fresh machine: one converts, the others reuse it."""
    import threading
    import time

    monkeypatch.setenv("DPO_PIPELINE_CACHE", str(tmp_path))
    calls = []

    def slow_convert(name, builtin, gguf_dir, target):
        calls.append(name)
        time.sleep(0.5)  # long enough for the other callers to arrive while this one works
        with loading.atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(modeling, "_convert_gguf", slow_convert)
    results, errors = [], []

    def call():
        try:
            results.append(loading.convert_builtin("smollm2-135m-instruct"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == ["smollm2-135m-instruct"]
    assert len(set(results)) == 1 and (results[0] / "config.json").is_file()
