"""The judge's own vLLM server (``judge.llm.serve``): an open model behind vLLM's OpenAI-compatible
server, started by the stage that judges and stopped when it is done, so that no API key is needed.

:class:`JudgeServer` resolves the model to a folder (a builtin is converted once, an ``hf:`` name is
taken from the Hugging Face cache) and names it ``<judge.llm.model>@<fingerprint of its weights>``:
that name is what the requests ask for, so the answer cache, which keys on it, never hands one
model's answers to another. The server starts on the judge's first request to send (a run whose
answers are all cached starts nothing): ``python -m vllm.entrypoints.openai.api_server`` on a free
port of 127.0.0.1, with a random API key, the CPU build's environment and preloaded libraries
(:mod:`pipeline.generation.vllm_backend.environment`) and the engine settings of ``judge.server``.
Its log goes to the stage's log; a server that exits or is not healthy (``GET /health``) within
``judge.server.startup_timeout_s`` fails the stage with its last lines.

No server outlives the stage: it runs under :mod:`.supervisor` in a process group of its own, which
the supervisor ends when the stage closes its end of a pipe -- on leaving the ``with`` block, on
failure, on SIGTERM or SIGHUP (which the block turns into an exit), and on ``kill -9``, when the
kernel closes it. The judge's client, cache, retries and parsing (:mod:`.client`, :mod:`.judge`)
are used as they are; only the client's endpoint comes from here (``client_factory``).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.settings.judge import JudgeParams, JudgeServerParams

log = logging.getLogger("pipeline.judging.llm.server")

KEY_ENV = "DPO_JUDGE_SERVER_KEY"  # the stage's client reads the server's random key from it
SUPERVISOR = Path(__file__).with_name("supervisor.py")
# SIGTERM to SIGKILL: vLLM stops in a few seconds; a server still running after this is killed.
STOP_GRACE_S = 15.0
TAIL_LINES = 40  # of the server's log, in the error when it fails to start
# What an hf: judge needs of its repository: config, safetensors weights, tokenizer and chat template.
HF_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class JudgeServerError(RuntimeError):
    """The judge's server failed to start; the message holds its last lines."""


def served_model_folder(spec: str) -> Path:
    """The folder of ``judge.llm.serve.model``: a local folder, a builtin (converted once) or an ``hf:``
    name (its weights, config and tokenizer files from the Hugging Face cache, downloaded if missing)."""
    from pipeline.model.builtin import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        from pipeline.model.loading import convert_builtin

        return convert_builtin(spec)
    if spec.startswith("hf:"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec[3:], allow_patterns=HF_FILES))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"judge.llm.serve.model: {spec!r} is not a model folder (no config.json), a builtin name "
            f"{sorted(BUILTIN_MODELS)} or hf:<org>/<name>"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(model_dir: Path, name: str, port: int, dtype: str, s: JudgeServerParams, gpu: bool) -> list[str]:
    """vLLM's OpenAI-compatible server for ``model_dir`` under ``name``. Run as a module: the console
    script of the CPU build (``vllm``) looks for a package named vllm and finds none."""
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
        *("--model", str(model_dir), "--served-model-name", name, "--dtype", dtype, "--seed", "0"),
        *("--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"),
        *("--tensor-parallel-size", str(s.tensor_parallel_size), "--max-model-len", str(s.max_model_len)),
        *("--max-num-seqs", str(s.max_num_seqs)),
    ]
    if s.enforce_eager:
        cmd.append("--enforce-eager")
    if s.block_size is not None:
        cmd += ["--block-size", str(s.block_size)]
    if gpu:
        cmd += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
    return cmd


def server_env(s: JudgeServerParams, key: str, gpu: bool) -> dict[str, str]:
    """The server's environment: this one, vLLM's caches, the CPU build's settings and libraries (the
    user's own values win), and the API key (an environment variable: not on the command line, which
    other users of the machine can read)."""
    from pipeline.generation.vllm_backend.environment import configure_cache_env, configure_cpu_env, cpu_preload_env
    from pipeline.model.loading import cache_root

    configure_cache_env(str(cache_root()))
    if not gpu:
        configure_cpu_env(s.cpu_kvcache_space_gb)
    env = cpu_preload_env() or dict(os.environ)
    env["VLLM_API_KEY"] = key
    return env


class JudgeServer:
    """The judge's own server when ``judge.llm.serve`` is set and ``backend`` (the judge the caller
    uses) is ``llm``; otherwise inert. ``llm`` and ``judge_kwargs`` are what to build the judge with
    (``get_judge(..., llm=server.llm, **server.judge_kwargs)``); the server starts on the judge's
    first request to send and stops on leaving ``with server:``."""

    def __init__(self, params: JudgeParams, backend: str):
        self.llm = params.llm
        self.judge_kwargs: dict[str, Any] = {}
        self.serve = params.llm.serve if backend == "llm" else None
        self.settings = params.server
        self._proc: subprocess.Popen | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pump: threading.Thread | None = None
        self._ready = False
        self._old_handlers: dict[int, Any] = {}
        if self.serve is None:
            return
        from pipeline.generation.vllm_backend.environment import visible_gpus
        from pipeline.model.loading import fingerprint

        self.model_dir = served_model_folder(self.serve.model)
        self.gpu = bool(visible_gpus())
        self.port = free_port()
        self._key = secrets.token_urlsafe(24)
        self.llm = params.llm.model_copy(
            update={
                "model": f"{params.llm.model}@{fingerprint(self.model_dir)}",
                "base_url": f"http://127.0.0.1:{self.port}/v1",
                "api_key_env": KEY_ENV,
            }
        )
        self.judge_kwargs = {"client_factory": self.client}

    # --------------------------------------------------------------- the judge's client
    def client(self, api_key: str):
        """The judge's ``openai`` client (``client_factory``), the server started first."""
        import openai

        self.start()
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=self.llm.base_url, timeout=self.llm.timeout_s, max_retries=self.llm.max_retries
        )

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the server (once) and wait until it is healthy."""
        if self._proc is not None or self.serve is None:
            return
        cmd = server_command(self.model_dir, self.llm.model, self.port, self.serve.dtype, self.settings, self.gpu)
        log.info("starting the judge's vLLM server: %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            [sys.executable, str(SUPERVISOR), "--grace", str(STOP_GRACE_S), "--", *cmd],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=server_env(self.settings, self._key, self.gpu),
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._log_lines, args=(self._proc.stdout,), daemon=True)
        self._pump.start()
        self._wait_healthy(time.monotonic())

    def _log_lines(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            self._tail.append(line)
            log.info("vllm| %s", line)

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        url = f"http://127.0.0.1:{self.port}/health"
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                self._fail("exited before it was ready")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    self._ready = True
                    log.info("the judge's vLLM server is up after %.0f s (%s)", time.monotonic() - t0, self.llm.model)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > self.settings.startup_timeout_s:
                self._fail(
                    f"was not healthy after judge.server.startup_timeout_s={self.settings.startup_timeout_s:g} s"
                )
            time.sleep(0.5)

    def _fail(self, what: str) -> None:
        self.stop()
        model = self.serve.model if self.serve else None
        tail = "\n".join(self._tail)
        raise JudgeServerError(f"the judge's vLLM server of {model!r} {what}; its last lines:\n{tail}")

    def stop(self) -> None:
        """Stop the server and every process it started (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._ready and proc.poll() is not None:
            log.warning("the judge's vLLM server had stopped by itself; its last lines:\n%s", "\n".join(self._tail))
        assert proc.stdin is not None
        proc.stdin.close()  # the supervisor stops the whole process group
        try:
            proc.wait(STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._pump is not None:
            self._pump.join(10)
        log.info("stopped the judge's vLLM server")

    def __enter__(self) -> JudgeServer:
        if self.serve is None:
            return self
        os.environ[KEY_ENV] = self._key  # read by the judge's client before it asks for the server
        if threading.current_thread() is threading.main_thread():
            self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            os.environ.pop(KEY_ENV, None)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers = {}

    @staticmethod
    def _on_signal(signum: int, frame: object) -> None:
        log.warning("got %s: stopping the judge's vLLM server", signal.Signals(signum).name)
        raise SystemExit(128 + signum)
