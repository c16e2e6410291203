"""The environment of a benchmark's child processes: they import the same ``pipeline`` package as the
benchmark that starts them, whatever the current directory (which stays the caller's, where the
pipeline's data and models are)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def child_env(**overrides: str) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, and ``overrides`` set."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *([path] if path else [])]), **overrides}


def loadavg() -> float | None:
    """The 1-minute load average (None where the system has none): above the benchmark's threads, other
    processes shared the CPU."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
