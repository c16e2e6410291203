"""The sampler vs training log-prob check: the transformers sampler's log-probs are the training code's."""

from __future__ import annotations

from pipeline.generation.logprob_check import logprob_check
from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import GenerationSettings


def test_transformers_samples_agree_with_the_training_code_path(tiny_model_dir):
    sampler = TransformersSampler(str(tiny_model_dir), batch_size=4, dtype="float32")
    prompts = ["What is 2 + 3?", "Name a colour."]
    out = sampler.generate(prompts, GenerationSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=1),
                           progress=None)
    flat = [(p, c) for p, cands in zip(prompts, out) for c in cands]
    check = logprob_check(str(tiny_model_dir), "float32", [p for p, _ in flat], [c for _, c in flat], batch_size=3)
    assert check["n"] == 4 and check["dtype"] == "float32"
    assert check["mean_abs_diff_per_token"] < 1e-3 and check["max_abs_diff"] >= check["mean_abs_diff"]


def test_no_candidates_no_model_loaded():
    assert logprob_check("/nonexistent-model", "float32", [], [], batch_size=4) == {"n": 0}
