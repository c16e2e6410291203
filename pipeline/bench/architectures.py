"""SmolLM2's architectures (the fields of each model's ``config.json``), built with random weights for the
benchmarks: speed, memory and precision depend on the shapes, not on the weights, and a machine without the
weights (or without network) can still build them. All share SmolLM2's tokenizer (49152 tokens), so the
pipeline's tokenizer encodes their pairs."""

from __future__ import annotations

import torch

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct's config.json)
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
# SmolLM2-360M: grouped-query attention, 3 query heads per key-value head
SMOLLM2_360M = {
    **SMOLLM2_135M,
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
}
# SmolLM2-1.7B: full multi-head attention (as many key-value heads as query heads), a larger RoPE base
SMOLLM2_1_7B = {
    **SMOLLM2_135M,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rope_theta": 130000.0,
}
# The same vocabulary (so the same token ids), two narrow layers: a quick run's stand-in
TINY = {
    **SMOLLM2_135M,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}

ARCHITECTURES = {
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-360m": SMOLLM2_360M,
    "smollm2-1.7b": SMOLLM2_1_7B,
    "tiny": TINY,
}


def _config(architecture: dict):
    from transformers import LlamaConfig

    config = LlamaConfig(**architecture)
    config._attn_implementation = "sdpa"  # what the pipeline's loaded models run (the 4D one-row-per-pair mask)
    return config


def random_model(architecture: dict, dtype: str, *, seed: int, device: str = "cpu"):
    """A Llama of ``architecture`` with random weights drawn from ``seed`` on ``device`` (built there: a GPU
    draws a large model's weights in a moment, a CPU takes a while), in ``dtype``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(_config(architecture))
    return model.to(getattr(torch, dtype))


def n_params(architecture: dict) -> int:
    """The parameter count of ``architecture`` (tied embeddings counted once), without allocating it."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_config(architecture))
    return sum(p.numel() for p in model.parameters())
