"""The judge's own vLLM server (pipeline/judging/llm/server.py, judge.llm.serve): its settings, its
command line and environment, and its lifecycle in the judge stage against a stand-in server process
(tests/standin_vllm_server.py, which takes vLLM's command line): started on the first request to send,
its log in the stage's, a failed or slow start failing the stage with its last lines, and no process
left behind -- after success, failure, SIGTERM and kill -9 of the stage. The same against vLLM's real
server: tests/judging/test_judge_server_vllm.py (slow)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from judge_server_utils import (
    TAG_ENV,
    assert_none_left,
    fake_model,
    judge_params,
    stage_process,
    standin_command,
    standin_log,
    write_inputs,
    write_params,
)
from repo_utils import repo_params
from standin_vllm_server import CRASH_LINE

from pipeline.judging.cache import CACHE_ENV, JudgeCache
from pipeline.judging.llm import server as server_mod
from pipeline.judging.llm.server import KEY_ENV, JudgeServer, JudgeServerError, server_command, server_env
from pipeline.model.loading import fingerprint
from pipeline.settings.base import ConfigError
from pipeline.settings.judge import JudgedPairs, JudgeParams, JudgeServerParams


@pytest.fixture
def tag(monkeypatch):
    """A tag in this process's environment, so every process a stage started here carries it; none
    may be left when the test ends."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, value)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    yield value
    assert_none_left(value, within_s=5)


# ----------------------------------------------------------------------------- settings
def test_serve_and_base_url_are_exclusive_and_the_server_section_is_required(tmp_path):
    raw = repo_params()
    raw["judge"]["llm"]["serve"] = {"model": "models/policy", "dtype": "auto"}
    raw["judge"]["llm"]["base_url"] = "http://localhost:8000/v1"
    with pytest.raises(ConfigError, match=r"^params\.yaml: judge\.llm\.serve: .*judge\.llm\.base_url must be null"):
        JudgedPairs.parse(raw)
    raw["judge"]["llm"]["base_url"] = None
    assert JudgedPairs.parse(raw).judge.llm.serve.model == "models/policy"
    raw["judge"]["llm"]["serve"]["dtype"] = "int3"
    with pytest.raises(ConfigError, match=r"judge\.llm\.serve\.dtype"):
        JudgedPairs.parse(raw)
    del raw["judge"]["server"]
    raw["judge"]["llm"]["serve"] = None
    with pytest.raises(ConfigError, match=r"judge\.server: Field required"):
        JudgedPairs.parse(raw)


def test_a_model_that_is_no_model_folder_fails_naming_the_key(tmp_path):
    params = JudgeParams(**judge_params(tmp_path, tmp_path / "nowhere")["judge"])
    with pytest.raises(ValueError, match=r"judge\.llm\.serve\.model: .*nowhere.* is not a model folder"):
        JudgeServer(params, "llm")
    # inert without serve, or when the caller's judge is the rule verifier: nothing resolved
    assert JudgeServer(params, "rule").llm is params.llm


def options(argv: list[str]) -> dict[str, str | None]:
    """``--key value`` and ``--flag`` (None) of a command line."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def test_server_command_and_environment(tmp_path, monkeypatch):
    s = JudgeServerParams(**repo_params()["judge"]["server"])
    cmd = server_command(tmp_path, "judge@abc", 8123, "bfloat16", s, gpu=False)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args = options(cmd[3:])
    assert args["--model"] == str(tmp_path) and args["--served-model-name"] == "judge@abc"
    assert args["--host"] == "127.0.0.1" and args["--port"] == "8123" and args["--dtype"] == "bfloat16"
    assert args["--max-model-len"] == str(s.max_model_len) and args["--max-num-seqs"] == str(s.max_num_seqs)
    assert ("--enforce-eager" in args) == s.enforce_eager and args["--block-size"] == str(s.block_size)
    assert "--disable-uvicorn-access-log" in args  # no log line per request
    assert "--gpu-memory-utilization" not in cmd  # CPU: the KV cache comes from VLLM_CPU_KVCACHE_SPACE
    gpu = server_command(tmp_path, "j", 1, "auto", s.model_copy(update={"block_size": None}), gpu=True)
    assert gpu[gpu.index("--gpu-memory-utilization") + 1] == str(s.gpu_memory_utilization)
    assert "--block-size" not in gpu

    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    env = server_env(s.model_copy(update={"cpu_kvcache_space_gb": 3}), "the-key", gpu=False)
    assert env["VLLM_API_KEY"] == "the-key" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert not any("the-key" in a for a in cmd)  # the key is never on the command line


# ----------------------------------------------------------------------------- lifecycle, in process
def run_stage(root: Path, monkeypatch, *extra: str) -> dict | None:
    from stages import judge as stage

    monkeypatch.chdir(root)
    stage.main(["--params", str(root / "params.yaml"), *extra])
    metrics = root / "metrics/judge.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def test_stage_serves_judges_stops_and_a_cached_rerun_starts_nothing(tmp_path, monkeypatch, caplog, tag):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(server_mod, "server_command", standin_command)
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "requests.jsonl"))
    model_dir = fake_model(tmp_path)
    write_inputs(tmp_path, 3, 4)
    write_params(tmp_path, judge_params(tmp_path, model_dir))

    run_stage(tmp_path, monkeypatch, "--dry-run")  # a dry run sends nothing, so it serves nothing
    assert "starting the judge's vLLM server" not in caplog.text and not standin_log(tmp_path / "requests.jsonl")

    metrics = run_stage(tmp_path, monkeypatch)
    served = f"judge@{fingerprint(model_dir)}"
    requests = standin_log(tmp_path / "requests.jsonl")
    # every candidate asked once, for the served name (and with the server's key: the fake refuses others)
    assert len(requests) == 12 and {r["model"] for r in requests} == {served}
    assert metrics["judge"] == f"llm-rubric:{served}" and metrics["llm"]["model"] == served
    assert metrics["llm"]["calls"] == 12 and metrics["llm"]["failed_requests"] == 0 and metrics["kept"] == 3
    # the server's log is in the stage's, and it was stopped
    assert f"vllm| stand-in vLLM server for {served}" in caplog.text
    assert "vllm| Application startup complete." in caplog.text and "stopped the judge's vLLM server" in caplog.text
    assert_none_left(tag)
    assert KEY_ENV not in os.environ

    caplog.clear()
    metrics = run_stage(tmp_path, monkeypatch)  # everything cached: no server at all
    assert "starting the judge's vLLM server" not in caplog.text
    assert metrics["llm"]["cache_hits"] == 12 and metrics["llm"]["calls"] == 0
    assert len(standin_log(tmp_path / "requests.jsonl")) == 12


@pytest.mark.parametrize(
    "mode,timeout,expected",
    [
        ("crash", 60, r"exited before it was ready; its last lines:\n(.|\n)*" + re.escape(CRASH_LINE)),
        ("hang", 3, r"was not healthy after judge\.server\.startup_timeout_s=3 s; its last lines:\n.*stand-in"),
    ],
)
def test_a_server_that_fails_to_start_fails_the_stage_with_its_last_lines(
    tmp_path, monkeypatch, tag, mode, timeout, expected
):
    monkeypatch.setattr(server_mod, "server_command", standin_command)
    monkeypatch.setenv("STANDIN_MODE", mode)
    write_inputs(tmp_path, 2, 4)
    params = judge_params(tmp_path, fake_model(tmp_path))
    params["judge"]["server"]["startup_timeout_s"] = timeout
    write_params(tmp_path, params)
    with pytest.raises(JudgeServerError, match=expected):
        run_stage(tmp_path, monkeypatch)
    assert not (tmp_path / "data/judge/selections.parquet").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert_none_left(tag, within_s=5)


# ----------------------------------------------------------------------------- killed stages
def wait_for_answers(cache: JudgeCache, n: int, proc, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(cache.keys()) < n:
        assert proc.poll() is None, "the stage ended before it could be killed"
        assert time.monotonic() < deadline, "the stage got too few answers"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stage_killed_mid_run_leaves_no_server_and_the_rerun_reuses_the_cache(tmp_path, tag, sig):
    requests = tmp_path / "requests.jsonl"
    write_inputs(tmp_path, 8, 4)
    write_params(tmp_path, judge_params(tmp_path, fake_model(tmp_path)))
    env = {"STANDIN_LOG": str(requests), "STANDIN_DELAY": "0.2"}

    proc = stage_process(tmp_path, tmp_path / "run1.log", True, **env)
    wait_for_answers(JudgeCache(tmp_path / "cache"), 6, proc)
    proc.send_signal(sig)
    rc = proc.wait(60)
    log1 = (tmp_path / "run1.log").read_text()
    if sig == signal.SIGTERM:  # the stage stops its server itself, and says so
        assert rc == 128 + signal.SIGTERM, log1
        assert "got SIGTERM: stopping the judge's vLLM server" in log1 and "stopped the judge's vLLM server" in log1
    else:  # nothing ran in the stage: the supervisor saw its pipe close
        assert rc == -signal.SIGKILL
    assert_none_left(tag, within_s=server_mod.STOP_GRACE_S + 5)
    assert not (tmp_path / "data/judge/selections.parquet").exists()
    cached = len(JudgeCache(tmp_path / "cache").keys())
    assert 6 <= cached < 32

    sent_before = len(standin_log(requests))
    proc = stage_process(tmp_path, tmp_path / "run2.log", True, **{**env, "STANDIN_DELAY": "0"})
    assert proc.wait(120) == 0, (tmp_path / "run2.log").read_text()
    metrics = json.loads((tmp_path / "metrics/judge.json").read_text())
    assert metrics["llm"]["cache_hits"] == cached and metrics["llm"]["calls"] == 32 - cached
    assert len(standin_log(requests)) - sent_before == 32 - cached  # what was cached was not asked again
    assert_none_left(tag, within_s=5)
