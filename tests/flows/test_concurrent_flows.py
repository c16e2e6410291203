"""Flows side by side on temporary Prefect servers, as a user starts them from two shells: each sweep
runs two DVC experiments at once, both servers keep their runs in one SQLite database (one
PREFECT_HOME), and nothing in either log reports SQLite locking or any other server error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from repo_utils import PROJECT


@pytest.mark.slow  # two temporary servers and six DVC experiments: about 1.5 min on 2 cores
def test_two_sweeps_with_max_parallel_2_share_a_prefect_home_without_lock_errors(shell_repos, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # no harness, no API URL
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PYTHONPATH": str(PROJECT),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "pipeline.flows",
        "--repo",
        "{repo}",
        "sweep",
        "-G",
        "a.x=[1,2,3]",
        "-G",
        "b.y=[4]",
        "-j",
        "2",
        "-n",
        "par",
        "second",
    ]
    procs = [
        subprocess.Popen(
            [a.format(repo=repo) for a in cmd],
            env=env,
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for repo in shell_repos(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
        # the temporary server writes its errors to the flow's own output
        assert "Starting temporary server" in log and "database is locked" not in log, log[-4000:]
        # Up to the temporary server's stop, no error at all. While it stops (after the flows finished),
        # Prefect's SQLAlchemy pool may log a cancelled SQLite rollback while its temporary server stops: its own
        # shutdown, not the flows'; anything else there still fails.
        body, _, stopping = log.partition("Stopping temporary server")
        assert "Traceback" not in body and "| ERROR" not in body, log[-4000:]
        assert all("sqlalchemy.pool" in line for line in stopping.splitlines() if "| ERROR" in line), log[-4000:]
        for x in (1, 2, 3):
            assert f"| par-{x} | done | {x} | 4 | 4 | 4 |" in log, log[-2000:]


def test_temporary_server_start_waits_for_the_lock_and_is_reused(tmp_path, monkeypatch):
    """Starting is serialised per PREFECT_HOME: a start waits while another process holds the lock,
    and the server it starts is the one the flow engine's client then uses (Prefect's singleton)."""
    import time

    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from pipeline.flows import server as ours

    started = []

    def fake_start(self, timeout=None):
        started.append((time.time(), timeout))
        self.running, self.port = True, 4999

    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "start", fake_start)
    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "_instances", {})
    holder = subprocess.Popen(  # another process starting its server: holds the lock for 1.5 s
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock\n"
            f"with FileLock({str(tmp_path / ours.LOCK_NAME)!r}):\n"
            "    print('held', flush=True); time.sleep(1.5); print(time.time(), flush=True)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "held\n"
    # no API URL, whatever ran before on this worker (the session harness sets one while it is up)
    with temporary_settings({PREFECT_HOME: str(tmp_path)}, restore_defaults={PREFECT_API_URL}):
        url = ours.start_temporary_server()
    released = float(holder.stdout.readline())
    holder.wait(timeout=30)
    assert url == "http://127.0.0.1:4999/api"
    [(t, timeout)] = started
    assert t >= released  # it waited for the other process's start
    assert timeout == 120  # pipeline.flows' start-up limit
    assert prefect_server.SubprocessASGIServer().api_url == url  # the instance get_client() starts


def test_no_temporary_server_when_an_api_url_is_set(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.flows.server import start_temporary_server

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert start_temporary_server() is None
