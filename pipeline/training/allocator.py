"""The memory allocator the train stage runs on a CPU (``train.runtime.cpu_allocator``).

glibc's malloc keeps much of what a training step frees: blocks below its mmap threshold (which rises to
32 MiB as larger ones are freed) come from heaps that return memory to the system only from their top, so a
step's freed activations stay resident. tcmalloc reuses them, and runs the step faster too (the memory
bench's figures: docs/distributed-training.md#memory-on-a-cpu). So on a CPU the stage re-executes itself with
tcmalloc in ``LD_PRELOAD`` (it takes effect only from a process's start); torchrun's workers inherit it.
Where tcmalloc is missing the stage says so and runs on the system's allocator. GPUs: nothing changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pipeline import preload

log = logging.getLogger("pipeline.train")

MARKER = "DPO_PIPELINE_TRAIN_PRELOADED"  # set in the re-executed process: re-execute once only
LIBS = {"tcmalloc": (preload.TCMALLOC,), "system": ()}


def allocator_env(
    choice: str,
    environ: Mapping[str, str] | None = None,
    prefix: str | None = None,
    machine: str | None = None,
) -> dict | None:
    """The environment to re-execute in for ``choice`` (a ``train.runtime.cpu_allocator``), or None where
    this process runs as it is: ``system``, re-executed already, not x86-64 Linux, or the library preloaded
    already or not found."""
    return preload.preload_env(LIBS[choice], MARKER, environ, prefix, machine) if LIBS[choice] else None


def reexec_with_allocator(choice: str, module: str, argv: Sequence[str], on_gpu: bool) -> None:
    """Re-execute ``python -m module argv`` on ``choice``'s allocator when training runs on a CPU and the
    allocator is not this process's already; otherwise return (and say so where tcmalloc is missing)."""
    if on_gpu or not LIBS[choice]:
        return
    env = allocator_env(choice)
    if env is not None:
        preload.reexec(module, argv, env, f"train.runtime.cpu_allocator: {choice}")
    elif not in_use(choice):
        log.warning(
            "train.runtime.cpu_allocator: %s not found (scripts/setup.sh installs it on x86-64 Linux); "
            "training runs on the system's allocator, which keeps more of what each step frees",
            choice,
        )


def in_use(choice: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``choice``'s libraries are in this process's ``LD_PRELOAD``."""
    have = preload.preloaded_libs(environ)
    return all(name in have for name in LIBS[choice])
