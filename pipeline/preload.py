"""Libraries a CPU process runs better with in ``LD_PRELOAD`` (tcmalloc, Intel OpenMP), and the
re-execution that puts them there: a preloaded library takes effect only from a process's start. The
sample stage preloads vLLM's CPU build's (:mod:`pipeline.generation.vllm_backend.environment`), the train
stage its allocator (:mod:`pipeline.training.allocator`). Imports torch only to count GPUs where
``CUDA_VISIBLE_DEVICES`` does not say."""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger("pipeline.preload")

TCMALLOC = "libtcmalloc_minimal.so.4"  # scripts/setup.sh unpacks Debian's libtcmalloc-minimal4 into .venv/lib


def visible_gpus() -> list[str]:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else torch's count; none without torch)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU machine
        return []


def find_lib(name: str, prefix: str | None = None) -> str | None:
    """``name`` under ``prefix``/lib (the virtual environment by default), else where the system's loader
    finds it, else None."""
    local = os.path.join(prefix or sys.prefix, "lib", name)
    if os.path.isfile(local):
        return local
    import ctypes.util

    found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
    return found if found and found.startswith(name.split(".so")[0]) else None


def preload_env(
    names: Sequence[str],
    marker: str,
    environ: Mapping[str, str] | None = None,
    prefix: str | None = None,
    machine: str | None = None,
) -> dict | None:
    """``environ`` with the libraries ``names`` (found by :func:`find_lib`) put in front of ``LD_PRELOAD``
    and ``marker`` set; None when there is nothing to do: ``marker`` is set already (re-executed), not
    x86-64 Linux, or each library is either preloaded already or not found."""
    env = dict(os.environ if environ is None else environ)
    machine = machine or f"{sys.platform}-{platform.machine()}"
    if env.get(marker) or machine != "linux-x86_64":
        return None
    have = env.get("LD_PRELOAD", "")
    libs = [path for name in names if name.split(".so")[0] not in have for path in [find_lib(name, prefix)] if path]
    if not libs:
        return None
    env["LD_PRELOAD"] = ":".join(libs + ([have] if have else []))
    env[marker] = "1"
    return env


def reexec(module: str, argv: Sequence[str], env: Mapping[str, str], why: str) -> None:
    """Replace this process with ``python -m module argv`` in ``env``; does not return."""
    log.info("re-executing with LD_PRELOAD=%s (%s)", env["LD_PRELOAD"], why)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], dict(env))


def preloaded_libs(environ: Mapping[str, str] | None = None) -> list[str]:
    """File names of the ``LD_PRELOAD`` libraries (for the metrics; no paths)."""
    value = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    return [os.path.basename(p) for p in value.replace(" ", ":").split(":") if p]
