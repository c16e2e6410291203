"""A stand-in for vLLM's OpenAI-compatible server, for the lifecycle tests of the judge's own server
(tests/judging/test_judge_server.py): it takes vLLM's command line, and behaves as the environment says.

- ``STANDIN_MODE=ok`` (default): starts an "engine" child that, like vLLM's engine core, does not die
  with this process; after ``STANDIN_START_DELAY`` seconds serves tests/fake_openai_server.py on
  ``--port`` with vLLM's key (``VLLM_API_KEY``), each answer ``STANDIN_DELAY`` seconds late, and
  appends every request (content id, model asked for) to the JSON-lines file ``STANDIN_LOG``.
- ``crash``: prints a few log lines and an error, and exits with status 1.
- ``hang``: never answers its readiness probe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai_server import FakeOpenAI  # noqa: E402 - after the path above

CRASH_LINE = "ValueError: the stand-in server refuses to start (STANDIN_MODE=crash)"


class LoggingFake(FakeOpenAI):
    def __init__(self, log_path: str | None, **kw):
        super().__init__(**kw)
        self.log_path = log_path

    def _handle(self, h) -> None:
        super()._handle(h)
        if self.log_path:
            with self._lock, open(self.log_path, "a") as f:
                rec = self.log[-1] if self.log else {}
                f.write(json.dumps({"content_id": rec.get("content_id"), "model": rec.get("model")}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    args, _ = parser.parse_known_args()
    mode = os.environ.get("STANDIN_MODE", "ok")
    print(f"stand-in vLLM server for {args.served_model_name} on port {args.port} ({mode})", flush=True)
    if mode == "crash":
        print("loading the model ...", flush=True)
        print(CRASH_LINE, file=sys.stderr, flush=True)
        sys.exit(1)
    # The engine: a child in this process group that outlives this process unless the group is ended.
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    if mode == "hang":
        threading.Event().wait()
    time.sleep(float(os.environ.get("STANDIN_START_DELAY", "0")))
    srv = LoggingFake(
        os.environ.get("STANDIN_LOG"),
        api_key=os.environ["VLLM_API_KEY"],
        delay=float(os.environ.get("STANDIN_DELAY", "0")),
        port=args.port,
    ).start()
    print("Application startup complete.", flush=True)
    try:
        threading.Event().wait()
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
