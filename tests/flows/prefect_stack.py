"""A real Prefect stack for the tests, on loopback: ``prefect server start`` on a free port with its own
``PREFECT_HOME``, process work pools, and ``prefect worker start`` processes, driven through Prefect's
own CLI exactly as the README's cluster section does. Everything started here is stopped on exit
(process groups, so a worker's flow-run subprocesses go too).

    with PrefectStack(tmp_path / "prefect") as stack:
        stack.cli("work-pool", "create", "local", "--type", "process")
        with stack.worker("local", cwd=repo):
            stack.cli("deployment", "run", "dpo-pipeline/gpu-box", "--watch", cwd=repo)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop ``proc`` and its process group (``sig`` first, SIGKILL after ``timeout`` s)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


class PrefectStack:
    """A Prefect server on 127.0.0.1:<free port>, its database under ``home``; workers on demand."""

    def __init__(self, home: Path, startup_timeout: float = 180, server_env: dict[str, str] | None = None):
        self.home = Path(home)
        self.server_env = server_env or {}  # extra settings of the server alone (e.g. its loop intervals)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.startup_timeout = startup_timeout
        self.server: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of anything that talks to this server (CLI, workers, flow runs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            {
                "PREFECT_HOME": str(self.home),
                "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "INFO",
                "DO_NOT_TRACK": "1",
            }
        )
        env.update(extra or {})
        return env

    def __enter__(self) -> PrefectStack:
        log = open(self.home / "server.log", "w")  # noqa: SIM115  (closed with the process)
        env = self.env()
        env.pop("PREFECT_API_URL")  # the server itself must not think a server is configured elsewhere
        env.update(self.server_env)
        self.server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.server.returncode}:\n{self.server_log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"prefect server not healthy after {self.startup_timeout} s:\n{self.server_log()}")

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            stop(p)
        if self.server is not None:
            stop(self.server)

    def server_log(self) -> str:
        path = self.home / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """``prefect <args>`` against this server; raises with the output when it fails (``check``)."""
        res = subprocess.run(
            [*PREFECT, *args], cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=timeout
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"prefect {' '.join(args)} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            )
        return res

    def start_worker(
        self,
        pool: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        *extra: str,
    ) -> subprocess.Popen:
        """``prefect worker start --pool <pool>`` in the background (its own process group)."""
        log = log or self.home / f"worker-{pool}-{len(self.procs)}.log"
        proc = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, *extra],
            cwd=cwd,
            env=self.env(env),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    @contextlib.contextmanager
    def worker(
        self, pool: str, cwd: Path | None = None, env: dict[str, str] | None = None, *extra: str
    ) -> Iterator[subprocess.Popen]:
        proc = self.start_worker(pool, cwd, env, None, *extra)
        try:
            yield proc
        finally:
            stop(proc)

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """A raw call of the server's REST API (``path`` after ``/api``)."""
        r = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kw)
        r.raise_for_status()
        return r

    # ------------------------------------------------------------------ reading back (REST API)
    def flow_runs(self) -> list[dict]:
        """Every flow run of this server: id, name, state_type, parent_task_run_id, parameters, ..."""
        return self.api("POST", "/flow_runs/filter", json={"limit": 200}).json()

    def flow_run_logs(self, flow_run_id: str) -> str:
        """The last 200 log lines of one flow run, oldest first."""
        logs = self.api(
            "POST",
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 200},
        ).json()
        return "\n".join(entry["message"] for entry in reversed(logs))

    def artifacts(self, key: str) -> list[dict]:
        """The artifacts with that key (each with its flow_run_id and data)."""
        return self.api("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL ``proc`` and every process descended from it, as if the machine died. Its process group is
    not enough: a process worker starts each flow run in a session of its own (Prefect's
    ``isolate_process_group``), and the flow runs DVC in another. Each process is stopped (SIGSTOP)
    before its children are listed, so none can start a child, or be left an orphan, meanwhile."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    todo = [psutil.Process(proc.pid)]
    while todo:
        p = todo.pop()
        with contextlib.suppress(psutil.NoSuchProcess):
            p.suspend()
            seen[p.pid] = p
            todo += [c for c in p.children() if c.pid not in seen]
    for p in seen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)
    return list(seen)
