"""The transformers backend on a tiny random model with SmolLM2's real tokenizer."""

from __future__ import annotations

import inspect

import pytest

from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import GenerationSettings
from pipeline.model import loading
from pipeline.model.encoding import encode_prompt
from pipeline.model.logprobs import batched_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return loading.load_model(tiny_model_dir, "float32").eval(), loading.load_tokenizer(tiny_model_dir)


def test_settings_from_params_have_no_default_here():
    """batch_size and dtype come from params.yaml (sample, policy.eval, evaluate.generation, policy.dtype)."""
    init = inspect.signature(TransformersSampler.__init__).parameters
    assert init["batch_size"].default is inspect.Parameter.empty
    assert init["dtype"].default is inspect.Parameter.empty
    assert inspect.signature(TransformersSampler.from_model).parameters["batch_size"].default is inspect.Parameter.empty


def test_sampler_is_deterministic_and_logprobs_are_the_policys(tiny):
    model, tok = tiny
    s = TransformersSampler.from_model(model, tok, "tiny", batch_size=4)
    prompts = ["What is 1 + 1?", "Name a colour.", "Count to three."]
    settings = GenerationSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5)
    a = s.generate(prompts, settings, progress=None)
    b = s.generate(prompts, settings, progress=None)
    c = s.generate(
        prompts, GenerationSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=6), progress=None
    )
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3, 3]
    flat = [(p, cand) for p, cands in zip(prompts, a) for cand in cands]
    tf, _ = batched_logprobs(
        model, [encode_prompt(tok, p) for p, _ in flat], [list(c.token_ids) for _, c in flat], tok.pad_token_id, 16
    )
    for (_, cand), lp in zip(flat, tf):
        assert cand.logprob_sum == pytest.approx(lp, abs=1e-3)
        assert cand.finish_reason in ("stop", "length")
        assert (cand.token_ids[-1] == tok.eos_token_id) == (cand.finish_reason == "stop")
