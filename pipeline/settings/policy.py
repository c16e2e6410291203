"""The ``policy:`` section: the starting policy, its optional SFT warm-up and its greedy evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.model.builtin import BUILTIN_MODELS
from pipeline.settings.base import Strict


def check_model(spec: str) -> str:
    """A builtin name, ``hf:<org>/<name>``, or a local folder holding a model (its ``config.json``)."""
    if spec in BUILTIN_MODELS or spec.startswith("hf:"):
        return spec
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"model folder {spec!r} does not exist (use a local folder with config.json, a builtin "
            f"name {sorted(BUILTIN_MODELS)}, or 'hf:<org>/<name>')"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{spec!r} has no config.json, so it is not a model folder")
    return spec


class GenerationParams(Strict):
    """Greedy decoding of the test prompts (policy.eval before training, evaluate.generation after)."""

    backend: Literal["transformers", "vllm"]
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # transformers: sequences per generate call


class WarmupParams(Strict):
    enabled: bool
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=8)
    seed: int
    bf16: bool  # bf16 autocast where train.bf16 would use it (GPUs, CPUs with native bf16)


class PolicyParams(Strict):
    # A builtin name ("smollm2-135m-instruct"), a local model folder, or "hf:<org>/<name>" (network).
    model: str
    dtype: Literal["float32", "bfloat16"]
    warmup: WarmupParams
    eval: GenerationParams

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str) -> str:
        return check_model(v)
