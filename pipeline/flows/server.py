"""The temporary Prefect server a flow run starts when no ``PREFECT_API_URL`` is set.

Flows started side by side (two shells, or a sweep next to a run) each start one, and all of them
keep their runs in the same SQLite file under ``PREFECT_HOME``. Two servers that start at the same
moment both migrate the database and register Prefect's block types, and one of them logs
``database is locked`` or ``UNIQUE constraint failed: block_type.slug``. So starting is serialised
with a file lock next to the database; once a server is up, SQLite's write-ahead log and Prefect's
60 s busy timeout let them share it. The flow then reuses this server instead of starting its own.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

LOCK_NAME = ".temporary-server.lock"


def uses_temporary_server() -> bool:
    """True when flow runs here would start a temporary server (no API URL is configured)."""
    from prefect.settings import get_current_settings

    s = get_current_settings()
    return not s.api.url and s.server.ephemeral.enabled is not False


def start_temporary_server() -> str | None:
    """Start this process's temporary Prefect server, one process at a time per ``PREFECT_HOME``; the
    flows of this process then use it. Returns its API URL, or None when a server is configured."""
    if not uses_temporary_server():
        return None
    import prefect.main  # noqa: F401  (Prefect's logging set-up, so its "Starting temporary server" shows)
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    s = get_current_settings()
    home = Path(s.home)
    home.mkdir(parents=True, exist_ok=True)
    server = SubprocessASGIServer()  # the instance the flow engine's client uses
    with FileLock(str(home / LOCK_NAME)):
        server.start(timeout=s.server.ephemeral.startup_timeout_seconds)
    return server.api_url
