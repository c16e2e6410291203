"""The vLLM :class:`~pipeline.generation.types.Sampler`: prompts encoded with the pipeline's chat
template, sampled on one in-process engine or a pool of data-parallel engines, decoded with the
pipeline's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.generation.types import Candidate, GenerationSettings
from pipeline.generation.vllm_backend.engine import (
    ENGINE_FACTORY,
    EngineSettings,
    RawSeq,
    load_factory,
    require_vllm,
)
from pipeline.generation.vllm_backend.environment import visible_gpus
from pipeline.generation.vllm_backend.pool import EnginePool, device_groups
from pipeline.model import loading
from pipeline.model.encoding import encode_prompt

class VLLMSampler:
    """:class:`~pipeline.generation.types.Sampler` on one in-process engine or a pool of data-parallel engines.

    The engine settings are the ``vllm`` section of params.yaml (``VLLMParams.sampler_kwargs()``) and
    ``policy.dtype``; none has a default here."""

    def __init__(self, model_path: str, *, dtype: str, tensor_parallel_size: int, data_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int | None, max_num_seqs: int,
                 enforce_eager: bool, cpu_kvcache_space_gb: float, block_size: int | None,
                 cache_dir: str | None = None,
                 model_id: str | None = None, engine_factory: str = ENGINE_FACTORY,
                 **extra):
        if engine_factory == ENGINE_FACTORY:
            require_vllm()
        self.tokenizer = loading.load_tokenizer(model_path)
        self.model_id = model_id or loading.fingerprint(model_path)
        es = EngineSettings(model=str(model_path), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
                            cpu_kvcache_space_gb=cpu_kvcache_space_gb, block_size=block_size,
                            cache_dir=cache_dir or str(loading.cache_root()), extra=extra)
        eos = self.tokenizer.eos_token_id
        gpus = visible_gpus()
        n = data_parallel_size or max(1, len(gpus) // tensor_parallel_size)
        if n == 1:
            self.pool, self.engine = None, load_factory(engine_factory)(es, eos)
        else:
            self.engine = None
            self.pool = EnginePool(n, es, eos, engine_factory,
                                   device_groups(n, tensor_parallel_size, gpus) if gpus else None)

    def generate(self, prompts: Sequence[str], settings: GenerationSettings,
                 progress: str | None = "sampling") -> list[list[Candidate]]:
        if settings.temperature == 0 and settings.n > 1:
            raise ValueError("greedy decoding (temperature 0) returns one candidate; set n: 1")
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        raw = (self.engine.run(prompt_ids, list(prompts), settings) if self.pool is None
               else self.pool.run(prompt_ids, list(prompts), settings))
        return [[self._candidate(r) for r in per_prompt] for per_prompt in raw]

    def _candidate(self, r: RawSeq) -> Candidate:
        ids, lp, reason = r
        return Candidate(text=self.tokenizer.decode(list(ids), skip_special_tokens=True).strip(),
                         token_ids=tuple(ids), logprob_sum=lp, finish_reason=reason)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.engine is not None:
            self.engine.close()
        self.pool = self.engine = None
