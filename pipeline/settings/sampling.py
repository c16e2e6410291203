"""The ``sample:``, ``sample_other:`` and ``vllm:`` sections: candidates per prompt, and the vLLM engines."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.settings.base import Strict
from pipeline.settings.policy import check_model


class SampleParams(Strict):
    backend: Literal["transformers", "vllm"]
    n: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # transformers: sequences per generate call
    seed: int
    # Prompts per saved chunk: a killed stage reruns only the chunks it had not finished.
    chunk_size: int = Field(ge=1)
    # Candidates whose sampler log-prob is re-computed by the training code (the difference is reported).
    logprob_check: int = Field(ge=0)
    # Finished chunks, outside every DVC output (a relative path is taken from the repository root,
    # also from a `dvc exp` temp workspace); not a DVC param, changing it reruns nothing.
    cache_dir: str
    # Seconds a claim on a chunk lasts unrenewed: its holder renews it every quarter of this, and a claim left
    # this long (its process killed, its machine gone) is taken over by the next process; waiting processes
    # look again every quarter of it. Must exceed the clock difference between machines sharing cache_dir.
    # How to run, not what: not a DVC param.
    lease_s: float = Field(gt=0)


class OtherSampleParams(SampleParams):
    """Candidates of another model: the rejected side of scenarios 3 and 4 (stage sample_other)."""

    # A builtin name, a local model folder or hf:<org>/<name>. Sampled only when pairs.scenario is 3
    # or 4; otherwise the stage writes an empty table.
    model: str

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str) -> str:
        return check_model(v)


class VLLMParams(Strict):
    """vLLM engines (sample.backend / sample_other.backend / *.eval backend: vllm). How to run, not
    what: not a DVC param of any stage."""

    tensor_parallel_size: int = Field(ge=1)  # GPUs per engine
    data_parallel_size: int = Field(ge=0)  # engines, each on a shard of the prompts; 0: all visible GPUs
    gpu_memory_utilization: float = Field(gt=0, le=1)
    max_model_len: int = Field(ge=16)  # prompt + response tokens per sequence
    max_num_seqs: int = Field(ge=1)  # sequences per engine step
    enforce_eager: bool  # false: torch.compile (faster on GPUs, slow to start on small CPUs)
    cpu_kvcache_space_gb: float = Field(gt=0)  # CPU build only (VLLM_CPU_KVCACHE_SPACE)
    # KV-cache block in tokens (null: vLLM's own). Prefix caching shares only full blocks, so the n
    # candidates of a prompt share its prefill only up to a multiple of this.
    block_size: int | None = Field(ge=1)
