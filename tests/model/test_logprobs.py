"""Log-probs on a tiny random model with SmolLM2's real tokenizer."""

import pytest
import torch

from pipeline.model import loading
from pipeline.model.logprobs import (
    collate,
    encode_prompt,
    encode_response,
    reference_check,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return loading.load_model(tiny_model_dir, "float32").eval(), loading.load_tokenizer(tiny_model_dir)


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


def test_one_precision_choice_for_training_reference_and_evaluation(tiny, monkeypatch):
    from pipeline.model import logprobs as LP

    # train.bf16 keeps its meaning: bf16 autocast on GPU, fp32 on CPU.
    assert LP.uses_bf16_autocast("cuda:0", True) and not LP.uses_bf16_autocast("cuda", False)
    assert not LP.uses_bf16_autocast("cpu", True)
    model, tok = tiny
    prompts = [encode_prompt(tok, "What is 2 + 2?"), encode_prompt(tok, "Hi")]
    responses = [encode_response(tok, "4, it is four"), encode_response(tok, "Hello there, friend")]
    fp32, _ = LP.batched_logprobs(model, prompts, responses, tok.pad_token_id, 2)
    assert LP.batched_logprobs(model, prompts, responses, tok.pad_token_id, 2, bf16=True)[0] == fp32
    # Where it applies, batched_logprobs (the reference stage, evaluation) scores under bf16 autocast.
    monkeypatch.setattr(LP, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    bf16, _ = LP.batched_logprobs(model, prompts, responses, tok.pad_token_id, 2, bf16=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = sequence_logprobs(model, *collate(prompts, responses, tok.pad_token_id))
    assert bf16 == pytest.approx(want.tolist(), abs=1e-4) and bf16 != pytest.approx(fp32, abs=1e-4)
