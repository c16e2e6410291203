"""The vLLM :class:`~pipeline.generation.types.Sampler`: prompts encoded with the pipeline's chat
template, sampled on one in-process engine or a pool of data-parallel engines, decoded with the
pipeline's tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from pipeline.settings.sampling import VLLMParams


def engine_settings(model_path, dtype: str, vllm: VLLMParams) -> EngineSettings:
    """The engine settings of params.yaml's ``vllm`` section for ``model_path`` in ``dtype``
    (``policy.dtype``), with the engines' caches in the pipeline's cache folder. Every field of the
    section but ``data_parallel_size`` (how many engines, not how each is built) is an engine setting."""
    return EngineSettings(
        model=str(model_path),
        dtype=dtype,
        cache_dir=str(loading.cache_root()),
        **vllm.model_dump(exclude={"data_parallel_size"}),
    )


class VLLMSampler:
    """:class:`~pipeline.generation.types.Sampler` on one in-process engine or a pool of data-parallel engines.

    ``settings`` build each engine (:func:`engine_settings`); ``data_parallel_size`` engines (0: one per
    ``tensor_parallel_size`` visible GPUs) share each call's prompts."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        data_parallel_size: int,
        model_id: str | None = None,
        engine_factory: str = ENGINE_FACTORY,
    ):
        if engine_factory == ENGINE_FACTORY:
            require_vllm()  # before the tokenizer or the model is touched
        self.tokenizer = loading.load_tokenizer(settings.model)
        self.model_id = model_id or loading.fingerprint(settings.model)
        eos = self.tokenizer.eos_token_id
        gpus = visible_gpus()
        n = data_parallel_size or max(1, len(gpus) // settings.tensor_parallel_size)
        if n == 1:
            self.pool, self.engine = None, load_factory(engine_factory)(settings, eos)
        else:
            self.engine = None
            self.pool = EnginePool(
                n,
                settings,
                eos,
                engine_factory,
                device_groups(n, settings.tensor_parallel_size, gpus) if gpus else None,
            )

    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings, progress: str | None = "sampling"
    ) -> list[list[Candidate]]:
        if settings.temperature == 0 and settings.n > 1:
            raise ValueError("greedy decoding (temperature 0) returns one candidate; set n: 1")
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        raw = (
            self.engine.run(prompt_ids, list(prompts), settings)
            if self.pool is None
            else self.pool.run(prompt_ids, list(prompts), settings)
        )
        return [[self._candidate(r) for r in per_prompt] for per_prompt in raw]

    def _candidate(self, r: RawSeq) -> Candidate:
        ids, lp, reason = r
        return Candidate(
            text=self.tokenizer.decode(list(ids), skip_special_tokens=True).strip(),
            token_ids=tuple(ids),
            logprob_sum=lp,
            finish_reason=reason,
        )

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.engine is not None:
            self.engine.close()
        self.pool = self.engine = None
