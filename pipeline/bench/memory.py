"""Resident memory of this process or a child (Linux ``/proc``), for the benchmarks' peak-memory figures."""

from __future__ import annotations

import resource


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (where /proc is missing: the peak so far, the closest figure there is)."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def process_rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` now; None when it cannot be read (the process is gone, or no /proc)."""
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def hwm_mb() -> float:
    """Peak resident memory since the last :func:`reset_hwm` (or since the process started)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-memory mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
