"""Pick a sampling backend by the name in params.yaml (``sample.backend``, ``policy.eval.backend``,
``evaluate.generation.backend``).

``transformers`` (:mod:`pipeline.generation.transformers_backend`) runs anywhere; ``vllm``
(:mod:`pipeline.generation.vllm_backend`, an optional extra) is imported only when selected. Both
return the same :class:`~pipeline.generation.types.Candidate` records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import Sampler

if TYPE_CHECKING:
    from pipeline.settings.sampling import VLLMParams


def _vllm(model_path: str, *, dtype: str, vllm: VLLMParams, model_id: str | None = None) -> Sampler:
    """The vLLM sampler with the engine settings of params.yaml's ``vllm`` section (``vllm``)."""
    # vLLM itself is imported only when an engine starts
    from pipeline.generation.vllm_backend.sampler import VLLMSampler, engine_settings

    return VLLMSampler(
        engine_settings(model_path, dtype, vllm), data_parallel_size=vllm.data_parallel_size, model_id=model_id
    )


SAMPLERS: dict[str, Callable[..., Sampler]] = {"transformers": TransformersSampler, "vllm": _vllm}


def get_sampler(backend: str, model_path: str, **kwargs) -> Sampler:
    """The backend's sampler; ``kwargs`` are its settings (all required: they come from params.yaml)."""
    if backend not in SAMPLERS:
        raise ValueError(f"sample.backend: unknown backend {backend!r} (available: {sorted(SAMPLERS)})")
    return SAMPLERS[backend](model_path, **kwargs)


def sampler_for(
    backend: str, model_path: str, *, dtype: str, batch_size: int, vllm: VLLMParams | None, model_id: str | None = None
) -> Sampler:
    """The sampler a stage asks for in params: transformers (``batch_size``) or vLLM (``vllm``: the
    params' ``vllm`` section, a :class:`pipeline.settings.sampling.VLLMParams`; unused by transformers)."""
    if backend == "vllm":
        if vllm is None:
            raise ValueError("backend vllm needs the engine settings of params.yaml's `vllm` section")
        return get_sampler("vllm", model_path, dtype=dtype, vllm=vllm, model_id=model_id)
    return get_sampler(backend, model_path, dtype=dtype, batch_size=batch_size, model_id=model_id)
