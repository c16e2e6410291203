"""Run a command in a process group of its own and end the whole group when the process that started
it goes away (the judge's own vLLM server, :mod:`.server`).

    python pipeline/judging/llm/supervisor.py --grace SECONDS -- COMMAND [ARG...]

The starter runs this file with ``start_new_session=True`` (a new session and process group, out of
reach of the signals a terminal or DVC sends to the starter's group) and a pipe on its standard input
whose writing end only the starter holds. End of file on that pipe -- the starter closed it, exited,
or was killed, ``kill -9`` included, for the kernel closes a dead process's files -- stops the group:
SIGTERM to every process in it (vLLM's server then stops its engine processes), SIGKILL after
``--grace`` seconds to whatever is left. vLLM's engine processes do not die with a killed server, so
the signal goes to the group, not to the server alone. SIGINT, SIGTERM and SIGHUP sent to this process
stop the group the same way. When the command exits on its own, whatever it left in the group is
killed too, and the last line says with which status it exited.

It is run as a file, not as a module of the package, and imports the standard library only: it needs
nothing of the project on its path.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import threading

STOPPED_LINE = "supervisor: the command exited with status {status}"


def _stop_when_stdin_closes(stop: threading.Event) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.set()


def _signal_group(sig: int) -> None:
    try:
        os.killpg(os.getpgrp(), sig)
    except ProcessLookupError:
        pass


def supervise(command: list[str], grace_s: float) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # A handler (not SIG_IGN) so that the command, after exec, gets the default dispositions.
        signal.signal(sig, lambda *_: stop.set())
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    threading.Thread(target=_stop_when_stdin_closes, args=(stop,), daemon=True).start()
    while child.poll() is None and not stop.wait(0.2):
        pass
    if child.poll() is None:
        _signal_group(signal.SIGTERM)  # this process's own handler only sets the event again
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        print(STOPPED_LINE.format(status=child.poll()), flush=True)
    except OSError:  # the starter is gone and with it the reading end of the log
        pass
    _signal_group(signal.SIGKILL)  # what is left, this process last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, required=True, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    supervise(command, args.grace)


if __name__ == "__main__":
    main()
