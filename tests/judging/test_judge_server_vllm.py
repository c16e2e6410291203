"""The judge's own server against vLLM's real OpenAI-compatible server (the CPU build in the venv),
serving the builtin SmolLM2-135M-Instruct. Its answers are a small model's: the tests check the protocol
-- every request answered and parsed, or counted as a parse failure; answers cached and not asked again;
structured output accepted -- not the judgement. Slow: each server takes a minute or more to start on
two cores. The lifecycle against a stand-in server, in the default suite: test_judge_server.py."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest
from judge_server_utils import (
    TAG_ENV,
    assert_none_left,
    judge_params,
    stage_process,
    vllm_servers,
    write_inputs,
    write_params,
)

from pipeline.judging.cache import CACHE_ENV, JudgeCache
from pipeline.judging.llm import server as server_mod
from pipeline.judging.llm.judge import LLMJudge
from pipeline.judging.llm.server import JudgeServer
from pipeline.judging.types import CandidateView, Group
from pipeline.settings.judge import JudgeParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"  # the builtin, served from its converted folder
N_PROMPTS, N_CANDS = 6, 4


@pytest.fixture
def tag(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, value)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    yield value
    assert_none_left(value, within_s=server_mod.STOP_GRACE_S + 5)
    assert not vllm_servers()


def groups() -> list[Group]:
    return [
        Group(
            f"p{i}",
            f"What is {i} + 2? Give the final answer as 'Answer: <number>'.",
            str(i + 2),
            tuple(CandidateView(j, f"{i} + 2 = {i + j}\nAnswer: {i + j}", 10 + j, "stop") for j in range(N_CANDS)),
        )
        for i in range(N_PROMPTS)
    ]


def check_protocol(judge: LLMJudge, planned: int) -> int:
    """Every request answered (and cached) or failed after its parse retries, nothing else; the
    number answered."""
    s = judge.stats
    answered = len(judge.cache.keys())
    assert s.requests_planned == planned and s.cache_hits == 0
    assert s.api_failures == 0  # the server answered every request
    assert answered + s.failed_requests == planned
    assert s.calls == answered + s.parse_failures  # a failed request is max_parse_retries + 1 bad answers
    assert s.failed_requests * (judge.p.max_parse_retries + 1) <= s.parse_failures
    return answered


def test_rubric_and_listwise_with_and_without_structured_output(tmp_path, tag, caplog):
    caplog.set_level("INFO")
    raw = judge_params(tmp_path, MODEL, max_failed_fraction=1.0, on_failure="ignore_failed", max_tokens=32)
    raw["judge"]["server"].update(startup_timeout_s=600, max_model_len=2048)
    params = JudgeParams(**raw["judge"])
    server = JudgeServer(params, "llm")
    assert server.llm.model.startswith("judge@") and server.llm.base_url.startswith("http://127.0.0.1:")
    seen = {}
    with server:
        for mode, structured in [("rubric", True), ("rubric", False), ("listwise", True), ("listwise", False)]:
            update = {"mode": mode, "structured_output": structured, "cache_dir": str(tmp_path / f"{mode}{structured}")}
            llm = server.llm.model_copy(update=update)
            judge = LLMJudge(llm, params.min_gap, client_factory=server.client)
            verdicts = judge.judge(groups())
            planned = N_PROMPTS * N_CANDS if mode == "rubric" else N_PROMPTS
            answered = check_protocol(judge, planned)
            assert judge.client.structured == structured  # the server took the JSON schema
            assert len(verdicts) == N_PROMPTS and {v.status for v in verdicts} <= {"ok", "tie", "failed"}
            seen[(mode, structured)] = (answered, judge.stats.parse_failures)
            if (mode, structured) == ("rubric", True):
                # a second judge on the same cache asks again for the failed requests only
                again = LLMJudge(llm, params.min_gap, client_factory=server.client)
                again.judge(groups())
                assert again.stats.cache_hits == answered
                assert again.stats.calls == again.stats.parse_failures + (len(again.cache.keys()) - answered)
                assert again.stats.requests_planned - again.stats.cache_hits == planned - answered
        assert len(vllm_servers()) == 1  # one server for every judge
    print("answered, parse failures per (mode, structured):", seen)
    assert caplog.text.count("starting the judge's vLLM server") == 1
    assert "vllm| " in caplog.text and "stopped the judge's vLLM server" in caplog.text
    # with the schema, the answers parse: at least most of them
    assert seen[("rubric", True)][0] >= N_PROMPTS * N_CANDS // 2


def test_stage_killed_mid_run_then_rerun_completes_from_the_cache(tmp_path, tag):
    write_inputs(tmp_path, 10, N_CANDS)
    raw = judge_params(tmp_path, MODEL, max_failed_fraction=1.0, on_failure="ignore_failed", max_in_flight=1)
    raw["judge"]["server"].update(startup_timeout_s=600, max_model_len=2048)
    write_params(tmp_path, raw)
    cache = JudgeCache(tmp_path / "cache")

    proc = stage_process(tmp_path, tmp_path / "run1.log", False)
    deadline = time.monotonic() + 600
    while len(cache.keys()) < 4:
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert_none_left(tag, within_s=server_mod.STOP_GRACE_S + 5)  # the supervisor ended the server's group
    cached = len(cache.keys())
    assert 4 <= cached < 40 and not (tmp_path / "data/judge/selections.parquet").exists()

    proc = stage_process(tmp_path, tmp_path / "run2.log", False)
    assert proc.wait(600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    metrics = json.loads((tmp_path / "metrics/judge.json").read_text())
    llm = metrics["llm"]
    assert llm["requests_planned"] == 40 and llm["cache_hits"] == cached  # nothing answered was asked again
    assert llm["api_failures"] == 0 and llm["calls"] == len(cache.keys()) - cached + llm["parse_failures"]
    assert metrics["judge"].startswith("llm-rubric:judge@") and metrics["n_groups"] == 10
    log2 = (tmp_path / "run2.log").read_text()
    assert "vllm| " in log2 and "stopped the judge's vLLM server" in log2
