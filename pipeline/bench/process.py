"""The benchmarks' child processes: their environment (they import the same ``pipeline`` package as the
benchmark that starts them, whatever the current directory, which stays the caller's, where the pipeline's
data and models are) and their run, each under a ceiling on its resident memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.memory import process_rss_mb

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.2  # how often a child's resident memory is read against its ceiling


def child_env(**overrides: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, and ``overrides`` set."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *([path] if path else [])]), **overrides}


def trainer_child_env(threads: int, datasets_cache: Path, allocator: str) -> dict[str, str]:
    """The environment of :mod:`pipeline.bench.trainer_child`: ``threads`` for torch's OpenMP and MKL, a
    datasets cache of its own (TRL caches precomputed reference log-probs there, keyed by the model: a
    configuration sharing it would skip its precompute pass), and the allocator the train stage would run
    on (``train.runtime.cpu_allocator``), for ours and TRL alike."""
    from pipeline.training.allocator import allocator_env

    env = child_env(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_DATASETS_CACHE=str(datasets_cache),
        TRANSFORMERS_VERBOSITY="error",
        DATASETS_VERBOSITY="error",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
    )
    return allocator_env(allocator, env) or env


def loadavg() -> float | None:
    """The 1-minute load average (None where the system has none): above the benchmark's threads, other
    processes shared the CPU."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def available_mb() -> float | None:
    """The memory the kernel can give new allocations without swapping (``MemAvailable``), or None where
    /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class ChildRun:
    returncode: int
    output: str  # stdout and stderr together (empty when shown as it ran)
    seconds: float
    out_of_memory: str | None  # why the child was stopped for its memory, or None
    rss_seen_mb: float  # the largest resident memory seen while it ran (read every POLL_S)


@dataclass(frozen=True)
class MemoryLimits:
    max_rss_mb: float | None  # the child's own ceiling
    min_available_mb: float | None  # the machine's memory left to others, below which the child is stopped


def _over(rss: float | None, limits: MemoryLimits) -> str | None:
    if rss is None:
        return None
    if limits.max_rss_mb is not None and rss > limits.max_rss_mb:
        return f"resident memory passed the ceiling of {limits.max_rss_mb:.0f} MB"
    available = available_mb()
    if limits.min_available_mb is not None and available is not None and available < limits.min_available_mb:
        return f"the machine's available memory fell to {available:.0f} MB (below {limits.min_available_mb:.0f} MB)"
    return None


def run_child(module_args: list[str], env: dict[str, str], *, verbose: bool, limits: MemoryLimits) -> ChildRun:
    """``python -m <module_args>`` in a fresh process, stopped (SIGKILL) as soon as its resident memory passes
    ``limits.max_rss_mb`` or the machine's available memory falls below ``limits.min_available_mb``: a
    configuration that does not fit is recorded as out of memory instead of letting the kernel's OOM killer
    pick a process, possibly another one on a shared machine. Its output goes through a file, so that a
    chatty child never blocks on a full pipe while its memory is watched."""
    start, seen = time.perf_counter(), 0.0
    with tempfile.TemporaryFile(mode="w+") as log:
        out = None if verbose else log
        proc = subprocess.Popen([sys.executable, "-m", *module_args], env=env, stdout=out, stderr=out, text=True)
        stopped = None
        while proc.poll() is None:
            rss = process_rss_mb(proc.pid)
            seen = max(seen, rss or 0.0)
            reason = _over(rss, limits)
            if reason is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                stopped = f"out of memory: {reason} at {rss:.0f} MB resident (stopped)"
                break
            time.sleep(POLL_S)
        if stopped is None and proc.returncode == -signal.SIGKILL:
            stopped = (
                f"out of memory: killed (SIGKILL) at {seen:.0f} MB resident or more, most likely by the OOM killer"
            )
        log.seek(0)
        return ChildRun(proc.returncode, log.read(), time.perf_counter() - start, stopped, seen)
