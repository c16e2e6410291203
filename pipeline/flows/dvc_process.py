"""DVC as a subprocess: run ``dvc <args>`` with its output streamed line by line, a wall-clock limit
that kills DVC and the stage command together, and failures that name the stage.

Every DVC call of the flows goes through here (``python -m dvc`` of the running interpreter), so DVC
alone decides what reruns: ``dvc repro --single-item <stage>`` skips an unchanged stage and restores
one whose run DVC's run-cache already holds. No Prefect here.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageFailed(RuntimeError):
    """A DVC stage (or experiment) that failed: its name, exit status and the last lines of its log."""

    def __init__(
        self,
        stage: str,
        returncode: int | None,
        tail: Iterable[str] = (),
        what: str = "stage",
        reason: str | None = None,
    ):
        self.stage, self.returncode, self.tail, self.what = stage, returncode, list(tail), what
        self.reason = reason or f"exit status {returncode}"
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (no output)"
        super().__init__(
            f"DVC {what} '{stage}' failed ({self.reason}); last {len(self.tail)} lines of its log:\n{lines}"
        )

    def __reduce__(self):
        return (self.__class__, (self.stage, self.returncode, self.tail, self.what, self.reason))


class StageTimeout(StageFailed):
    pass


@dataclass
class DvcRun:
    returncode: int
    tail: list[str]
    seconds: float
    statuses: dict[str, str] = field(default_factory=dict)  # stage -> ran | skipped | restored


TIMED_OUT = -9  # DvcRun.returncode of a run killed at its time limit

_STATUS_PATTERNS = (
    (re.compile(r"Running stage '([^']+)'"), "ran"),
    (re.compile(r"Stage '([^']+)' didn't change, skipping"), "skipped"),
    (re.compile(r"Stage '([^']+)' is cached - skipping run"), "restored"),
)


def stage_statuses(lines: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        for pattern, status in _STATUS_PATTERNS:
            if m := pattern.search(line):
                out[m.group(1)] = status
    return out


def dvc_env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter's bin first on PATH (stage commands say
    ``python``), unbuffered output so that log lines arrive as they are written."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_dvc(
    args: list[str],
    cwd: str | os.PathLike,
    on_line: Callable[[str], Any] | None = None,
    timeout_s: float | None = None,
    *,
    tail_lines: int,
) -> DvcRun:
    """Run ``dvc <args>`` in ``cwd``, handing every output line (stdout and stderr) to ``on_line`` as it
    comes; the last ``tail_lines`` lines are kept for the error message. Past ``timeout_s`` the whole
    process group (DVC and the stage command) is terminated and the return code is :data:`TIMED_OUT`.
    The lines are consumed in the calling thread (Prefect's run logger is bound to it)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        dvc_cmd(*args),
        cwd=cwd,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def _read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=_read, daemon=True).start()
    tail: deque[str] = deque(maxlen=tail_lines)
    statuses: dict[str, str] = {}
    deadline = start + timeout_s if timeout_s else None
    timed_out = False
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            raw = lines.get(timeout=wait)
        except queue.Empty:
            timed_out = True
            kill_group(proc)
            break
        if raw is None:
            break
        # progress bars redraw with \r: keep what the line finally shows
        line = raw.rstrip("\n").split("\r")[-1].rstrip()
        if not line:
            continue
        tail.append(line)
        statuses.update(stage_statuses([line]))
        if on_line is not None:
            on_line(line)
    rc = proc.wait()
    return DvcRun(
        returncode=TIMED_OUT if timed_out else rc, tail=list(tail), seconds=time.monotonic() - start, statuses=statuses
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``proc`` (started with ``start_new_session``), SIGKILL if it
    outlives the grace period."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def dvc_output(args: list[str], cwd: str | os.PathLike) -> str:
    """Run a quick DVC command and return its stdout; raise with its output on failure."""
    proc = subprocess.run(dvc_cmd(*args), cwd=cwd, env=dvc_env(), capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(
            f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return proc.stdout


def repro_stage(
    repo: str | os.PathLike,
    stage: str,
    on_line: Callable[[str], Any] | None = None,
    *,
    timeout_s: float,
    tail_lines: int,
    pull: bool = False,
) -> DvcRun:
    """``dvc repro --single-item <stage>``: DVC reruns it only if its deps, params or command changed
    (or restores it from the run-cache). ``timeout_s``: wall-clock limit, 0 for none; ``pull``: fetch
    missing inputs from the default remote first. Raises :class:`StageFailed` naming the stage."""
    args = ["repro", "--single-item", *(["--pull"] if pull else []), stage]
    run = run_dvc(args, repo, on_line, timeout_s or None, tail_lines=tail_lines)
    if run.returncode == TIMED_OUT:
        raise StageTimeout(stage, None, run.tail, reason=f"timed out after {timeout_s:g} s")
    if run.returncode:
        exited = [m.group(1) for line in run.tail if (m := re.search(r"exited with (-?\d+)", line))]
        raise StageFailed(
            stage, run.returncode, run.tail, reason=f"its command exited with {exited[-1]}" if exited else None
        )
    run.statuses.setdefault(stage, "skipped")
    return run
