"""The sampler vs training log-prob check: the transformers sampler's log-probs are the training code's."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.generation.logprob_check import logprob_check
from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import GenerationSettings


def test_transformers_samples_agree_with_the_training_code_path(tiny_model_dir):
    sampler = TransformersSampler(str(tiny_model_dir), batch_size=4, dtype="float32")
    prompts = ["What is 2 + 3?", "Name a colour."]
    out = sampler.generate(
        prompts, GenerationSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=1), progress=None
    )
    flat = [(p, c) for p, cands in zip(prompts, out) for c in cands]
    check = logprob_check(str(tiny_model_dir), "float32", [p for p, _ in flat], [c for _, c in flat], batch_size=3)
    assert check["n"] == 4 and check["dtype"] == "float32"
    assert check["mean_abs_diff_per_token"] < 1e-3 and check["max_abs_diff"] < 1e-2

    # The check reports the gaps there are: the sampler's sums shifted by known amounts come back as those
    # amounts (up to the sampler's own gap, below 1e-2 per sequence above)
    offsets = [0.5, -2.0, 1.0, 0.0]
    shifted = [dataclasses.replace(c, logprob_sum=c.logprob_sum + off) for (_, c), off in zip(flat, offsets)]
    off = logprob_check(str(tiny_model_dir), "float32", [p for p, _ in flat], shifted, batch_size=3)
    assert off["n"] == 4
    assert off["mean_diff"] == pytest.approx(check["mean_diff"] + sum(offsets) / 4, abs=1e-9)  # (0.5 − 2 + 1 + 0)/4
    assert off["mean_abs_diff"] == pytest.approx(sum(map(abs, offsets)) / 4, abs=1e-2)  # (0.5 + 2 + 1 + 0)/4
    assert off["max_abs_diff"] == pytest.approx(2.0, abs=1e-2)
    n_tokens = [len(c.token_ids) for _, c in flat]
    assert off["mean_abs_diff_per_token"] == pytest.approx(
        sum(abs(o) / n for o, n in zip(offsets, n_tokens)) / 4, abs=1e-3
    )


def test_no_candidates_no_model_loaded():
    assert logprob_check("/nonexistent-model", "float32", [], [], batch_size=4) == {"n": 0}
