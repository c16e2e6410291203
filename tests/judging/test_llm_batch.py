"""The LLM judge through the OpenAI Batch API (judge.llm.batch: true; pipeline/judging/llm/batch.py): the whole
lifecycle against the fake server's Files and Batches endpoints (tests/fake_openai_server.py), resume after a
timeout and after SIGKILL, expired, cancelled and failed batches, per-request failures, the batch price; and the
file format against vLLM's own offline batch runner (slow)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import polars as pl
import pytest
from fake_openai_server import FakeOpenAI
from llm_judge_helpers import (
    KEY,
    KEY_ENV,
    all_text_under,
    llm_params,
    make_groups,
    make_judge,
    q_of,
    run_stage_inprocess,
    stage_proc,
    write_inputs,
    write_params,
)

from pipeline.judging.cache import CACHE_ENV, JudgeCache
from pipeline.judging.llm import batch as batch_mod
from pipeline.judging.llm.batch_format import ENDPOINT, read_results, request_line, split_lines
from pipeline.judging.llm.client import LLMJudgeError, Outcome

OUTPUTS = ("scores.parquet", "selections.parquet", "llm_judgements.jsonl")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)


def batch_params(srv: FakeOpenAI, cache: Path, **kw) -> dict:
    return llm_params(srv.base_url, cache, **{"batch": True, "batch_poll_s": 0.02, "batch_timeout_s": 30, **kw})


def records(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache / "batches").glob("*.json"))]


def input_ids(srv: FakeOpenAI, batch_id: str) -> list[str]:
    data = srv.files[srv.batches[batch_id]["input_file_id"]]["data"].decode()
    return [json.loads(x)["custom_id"] for x in data.splitlines()]


def key_of(judge, groups) -> dict[str, str]:
    """content id (p<i>-c<j>) -> cache key of its rubric request."""
    return {f"{r.meta['prompt_id']}-c{r.meta['candidate_idx']}": r.key for r in judge.plan(groups)}


def assert_expected_scores(root: Path, n_prompts: int) -> None:
    scores = pl.read_parquet(root / "data/judge/scores.parquet")
    assert {(r["prompt_id"], r["candidate_idx"]): r["score"] for r in scores.iter_rows(named=True)} == {
        (f"p{i}", j): float(q_of(i, j)) for i in range(n_prompts) for j in range(4)
    }


# ----------------------------------------------------------------------------- the file format
def test_request_lines_and_result_lines():
    line = json.loads(request_line("k1", {"model": "m", "messages": [{"role": "user", "content": "é"}]}))
    assert line == {"custom_id": "k1", "method": "POST", "url": ENDPOINT, "body": line["body"]}
    assert line["body"]["messages"][0]["content"] == "é"

    text = "\n".join(
        [
            "not json",
            json.dumps({"id": "x", "response": None}),  # no custom_id
            json.dumps(
                {"custom_id": "ok", "response": {"status_code": 200, "body": _completion('{"score": 4}', 7, 2)}}
            ),
            json.dumps({"custom_id": "r429", "response": {"status_code": 429, "body": {"error": {"message": "slow"}}}}),
            json.dumps({"custom_id": "nochoice", "response": {"status_code": 200, "body": {"choices": []}}}),
            json.dumps({"custom_id": "exp", "response": None, "error": {"code": "batch_expired", "message": "late"}}),
            "",
        ]
    )
    found, problems = read_results(text, "out.jsonl")
    assert problems == ["out.jsonl line 1: not JSON", "out.jsonl line 2: no custom_id"]
    got = {r.custom_id: (r.content, r.failure, r.usage["prompt_tokens"]) for r in found}
    assert got == {
        "ok": ('{"score": 4}', None, 7),
        "r429": (None, "http_429", 0),
        "nochoice": (None, "malformed_response", 0),
        "exp": (None, "batch_batch_expired", 0),
    }


def test_requests_are_split_by_count_and_size():
    assert split_lines([10] * 7, 3, 1000) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert split_lines([40, 40, 40, 10], 100, 90) == [slice(0, 2), slice(2, 4)]
    assert split_lines([], 3, 100) == []
    with pytest.raises(ValueError, match="request 1 is 200 bytes"):
        split_lines([10, 200], 3, 100)


def _completion(content: str, pt: int, ct: int) -> dict:
    message = {"role": "assistant", "content": content}
    return {"choices": [{"message": message}], "usage": {"prompt_tokens": pt, "completion_tokens": ct}}


def test_absorb_caches_answers_and_counts_every_other_line_as_a_failure_or_a_retry(tmp_path, caplog):
    j = make_judge("http://127.0.0.1:9/v1", tmp_path, batch=True, max_parse_retries=1)
    groups = make_groups(2)
    reqs = j.plan(groups)
    k = key_of(j, groups)
    by_key = {r.key: r for r in reqs}
    rows = [
        {"custom_id": k["p0-c0"], "response": {"status_code": 200, "body": _completion('{"score": 5}', 100, 3)}},
        {"custom_id": k["p0-c1"], "response": {"status_code": 200, "body": _completion("no idea", 90, 2)}},
        {"custom_id": k["p0-c2"], "response": {"status_code": 500, "body": {"error": {"message": "oops"}}}},
        {"custom_id": "not-ours", "response": {"status_code": 200, "body": _completion('{"score": 1}', 1, 1)}},
    ]
    out = "\n".join(json.dumps(r) for r in rows) + "\n{broken"
    err = json.dumps({"custom_id": k["p0-c3"], "response": None, "error": {"code": "batch_expired", "message": "x"}})
    results: dict[str, Outcome] = {}
    again = j.sender.absorb([("out", out), ("err", err)], "batch_9", list(by_key), by_key, results)

    assert [r.key for r in again] == [k["p0-c1"]]  # malformed, one retry left: asked again synchronously
    assert results[k["p0-c0"]].answer == {"score": 5}
    assert {key: results[key].failure for key in (k["p0-c2"], k["p0-c3"])} == {
        k["p0-c2"]: "http_500",
        k["p0-c3"]: "batch_batch_expired",
    }
    # p1's four requests got no line at all
    assert sorted(key for key, o in results.items() if o.failure == "batch_missing") == sorted(
        k[f"p1-c{i}"] for i in range(4)
    )
    rec = JudgeCache(tmp_path).get(k["p0-c0"])
    assert rec["batch_id"] == "batch_9" and rec["usage"] == {"prompt_tokens": 100, "completion_tokens": 3}
    assert len(JudgeCache(tmp_path).keys()) == 1
    s = j.stats
    assert (s.calls, s.api_failures, s.parse_failures, s.failed_requests) == (8, 6, 1, 6)
    assert (s.batch_prompt_tokens, s.batch_completion_tokens) == (190, 5) == (s.prompt_tokens, s.completion_tokens)
    assert "err line 1" not in caplog.text and "batch batch_9 file out line 5: not JSON" in caplog.text
    assert "'not-ours' is not one of its requests" in caplog.text


# ----------------------------------------------------------------------------- the lifecycle over HTTP
def test_batch_run_fills_the_shared_cache_at_the_batch_price(tmp_path, monkeypatch):
    groups = make_groups(3)
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_inputs(root, groups)
    with FakeOpenAI(KEY) as srv:
        write_params(a, batch_params(srv, tmp_path / "cache_a"))
        m = run_stage_inprocess(a, monkeypatch)["llm"]

        # one upload of the Batch API's JSONL, one batch: every request a line with the synchronous body
        [fid], [bid] = srv.calls("files.create"), srv.calls("batches.create")
        batch = srv.batches[bid]
        assert (batch["input_file_id"], batch["endpoint"], batch["completion_window"]) == (fid, ENDPOINT, "24h")
        assert batch["status"] == "completed" and srv.files[fid]["purpose"] == "batch"
        judge = make_judge(srv.base_url, tmp_path / "unused")
        planned = {r.key: r for r in judge.plan(groups)}
        lines = [json.loads(x) for x in srv.files[fid]["data"].decode().splitlines()]
        assert sorted(x["custom_id"] for x in lines) == sorted(planned)
        for x in lines:
            assert (x["method"], x["url"]) == ("POST", ENDPOINT)
            assert x["body"] == judge.client.body(planned[x["custom_id"]], True)
        assert len(srv.requests()) == 12 and all(r["via"] == "batch" for r in srv.requests())
        assert len(srv.calls("files.content")) == 1  # the output file; no error file
        assert_expected_scores(a, 3)
        assert records(tmp_path / "cache_a") == []  # the record goes once the batch is collected

        assert (m["calls"], m["failed_requests"], m["cache_hits"]) == (12, 0, 0)
        assert m["batch"]["batch_ids"] == [bid] and m["batch"]["price_factor"] == 0.5
        assert (m["batch"]["prompt_tokens"], m["batch"]["completion_tokens"]) == (
            m["prompt_tokens"],
            m["completion_tokens"],
        )
        full_price = m["prompt_tokens"] / 1000 * 0.0025 + m["completion_tokens"] / 1000 * 0.01
        assert m["prompt_tokens"] > 0 and m["cost_usd"] == pytest.approx(0.5 * full_price, abs=1e-6)

        # the same outputs as the synchronous mode
        write_params(b, llm_params(srv.base_url, tmp_path / "cache_b"))
        run_stage_inprocess(b, monkeypatch)
        for p in OUTPUTS:
            assert (a / "data/judge" / p).read_bytes() == (b / "data/judge" / p).read_bytes(), p

        # either mode takes the other's answers from the cache and sends nothing
        mark, calls = srv.mark(), len(srv.api_calls)
        write_params(a, llm_params(srv.base_url, tmp_path / "cache_a"))
        m2 = run_stage_inprocess(a, monkeypatch)["llm"]
        write_params(b, batch_params(srv, tmp_path / "cache_b"))
        m3 = run_stage_inprocess(b, monkeypatch)["llm"]
        assert srv.mark() == mark and len(srv.api_calls) == calls
        assert m2["cache_hits"] == m3["cache_hits"] == 12 and m2["calls"] == m3["calls"] == 0
        # the answers the batch gave are valued at the batch price
        assert m2["cost_usd_saved_by_cache"] == pytest.approx(m["cost_usd"], abs=1e-6)


def test_dry_run_prices_a_batch_run_at_the_batch_price(tmp_path):
    groups = make_groups(3)
    sync = make_judge("http://127.0.0.1:9/v1", tmp_path).dry_run(groups)
    batch = make_judge("http://127.0.0.1:9/v1", tmp_path, batch=True, batch_price_factor=0.4).dry_run(groups)
    assert batch["est_cost_usd"] == pytest.approx(0.4 * sync["est_cost_usd"], abs=1e-6)
    assert batch["max_cost_usd"] == pytest.approx(0.4 * sync["max_cost_usd"], abs=1e-6)


def test_per_request_failures_are_handled_as_in_the_synchronous_mode(tmp_path):
    groups = make_groups(3)
    faults = {
        "p0-c0": ["500"],  # error file, status 500: failed, submitted again by the rerun
        "p1-c1": ["429"],  # the same with 429
        "p0-c1": ["prose"],  # malformed answer: asked again synchronously, then answered
        "p1-c0": ["badbody"],  # status 200 without a chat completion: the same
        "p0-c2": ["range"] * 3,  # malformed in the batch and in both synchronous retries: failed
    }
    with FakeOpenAI(KEY, faults=faults) as srv:
        j = make_judge(srv.base_url, tmp_path / "c", batch=True, batch_poll_s=0.02, max_failed_fraction=0.5)
        k = key_of(j, groups)
        v = {x.prompt_id: x for x in j.judge(groups)}
        assert srv.calls("batches.create") == ["batch_1"]
        assert len(srv.requests()) == 12 + 4 and sum(r["via"] == "batch" for r in srv.requests()) == 12
        assert sorted(r["content_id"] for r in srv.requests() if r["via"] == "http") == sorted(
            ["p0-c1", "p1-c0", "p0-c2", "p0-c2"]
        )
        m = j.metrics
        assert m["failure_reasons"] == {"http_429": 1, "http_500": 1, "malformed_answer": 1}
        assert (m["failed_requests"], m["api_failures"], m["parse_failures"], m["calls"]) == (3, 2, 5, 16)
        assert (v["p0"].status, v["p1"].status, v["p2"].status) == ("failed", "failed", "ok")
        assert v["p0"].extra["failures"] == {"0": "http_500", "2": "malformed_answer"}
        # the synchronous retries are paid at the full price, the batch lines at the batch price
        assert 0 < m["batch"]["prompt_tokens"] < m["prompt_tokens"]

        # the rerun submits exactly the three failed requests, as a new batch
        j2 = make_judge(srv.base_url, tmp_path / "c", batch=True, batch_poll_s=0.02)
        assert all(x.status == "ok" for x in j2.judge(groups))
        assert srv.calls("batches.create") == ["batch_1", "batch_2"]
        assert sorted(input_ids(srv, "batch_2")) == sorted(k[c] for c in ("p0-c0", "p1-c1", "p0-c2"))

        # max_failed_fraction applies: too many failures abort, the answers stay cached
        srv.faults = {"p0-c0": ["500"]}
        j3 = make_judge(srv.base_url, tmp_path / "c3", batch=True, batch_poll_s=0.02, max_failed_fraction=0.0)
        with pytest.raises(LLMJudgeError, match="max_failed_fraction"):
            j3.judge(groups)
        assert len(JudgeCache(tmp_path / "c3").keys()) == 11


def test_large_runs_go_out_as_several_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_mod, "MAX_REQUESTS", 5)
    groups = make_groups(3)
    with FakeOpenAI(KEY) as srv:
        j = make_judge(srv.base_url, tmp_path, batch=True, batch_poll_s=0.02)
        assert all(v.status == "ok" for v in j.judge(groups))
        assert srv.calls("batches.create") == ["batch_1", "batch_2", "batch_3"] == j.metrics["batch"]["batch_ids"]
        assert [len(input_ids(srv, b)) for b in srv.calls("batches.create")] == [5, 5, 2]


def test_a_run_that_stops_waiting_is_resumed_by_the_rerun(tmp_path, monkeypatch):
    groups = make_groups(3)
    write_inputs(tmp_path, groups)
    with FakeOpenAI(KEY) as srv:
        srv.batch_hold = True
        write_params(tmp_path, batch_params(srv, tmp_path / "cache", batch_timeout_s=0.3))
        with pytest.raises(LLMJudgeError, match=r"batch_1 not finished after batch_timeout_s=0.3 s.*Rerun the stage"):
            run_stage_inprocess(tmp_path, monkeypatch)
        assert not (tmp_path / "data/judge").exists()
        [rec] = records(tmp_path / "cache")
        assert rec["batch_id"] == "batch_1" and rec["endpoint"] == srv.base_url and len(rec["keys"]) == 12

        srv.batch_hold = False
        calls = len(srv.api_calls)
        write_params(tmp_path, batch_params(srv, tmp_path / "cache"))
        m = run_stage_inprocess(tmp_path, monkeypatch)["llm"]
        later = srv.api_calls[calls:]
        assert srv.calls("batches.create") == ["batch_1"] and srv.calls("files.create") == ["file-1"]
        assert {i for op, i in later if op == "batches.retrieve"} == {"batch_1"}
        assert m["batch"]["batch_ids"] == ["batch_1"] and m["calls"] == 12
        assert_expected_scores(tmp_path, 3)
        assert records(tmp_path / "cache") == []


def test_a_killed_stage_resumes_polling_the_same_batch(tmp_path):
    groups = make_groups(3)
    root, logs = tmp_path / "a", tmp_path / "logs"
    logs.mkdir()
    write_inputs(root, groups)
    with FakeOpenAI(KEY) as srv:
        srv.batch_hold = True
        write_params(root, batch_params(srv, tmp_path / "cache", batch_poll_s=0.05))
        proc = stage_proc(root, "../logs/run1")
        deadline = time.monotonic() + 60
        while len(srv.calls("batches.retrieve")) < 3:  # submitted and polled in progress
            assert proc.poll() is None, (logs / "run1.out").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        assert [r["batch_id"] for r in records(tmp_path / "cache")] == ["batch_1"]
        assert JudgeCache(tmp_path / "cache").keys() == []

        srv.batch_hold = False
        calls = len(srv.api_calls)
        proc = stage_proc(root, "../logs/run2")
        assert proc.wait(60) == 0, (logs / "run2.out").read_text()
        assert srv.calls("batches.create") == ["batch_1"] and srv.calls("files.create") == ["file-1"]
        assert {i for op, i in srv.api_calls[calls:] if op.startswith("batches.")} == {"batch_1"}
        assert "resuming batch batch_1" in (logs / "run2.out").read_text()
        assert len(srv.requests()) == 12  # every request answered once
    assert_expected_scores(root, 3)
    assert records(tmp_path / "cache") == []
    text = all_text_under(tmp_path)
    assert KEY not in text and KEY[8:] not in text


@pytest.mark.parametrize("outcome", ["expired", "failed"])
def test_an_expired_or_failed_batch_fails_the_stage_and_the_rerun_sends_only_the_rest(tmp_path, outcome):
    groups = make_groups(3)
    with FakeOpenAI(KEY) as srv:
        srv.batch_outcome, srv.batch_partial = outcome, 5
        j = make_judge(srv.base_url, tmp_path, batch=True, batch_poll_s=0.02)
        k = key_of(j, groups)
        expected = {
            "expired": r"batch batch_1 expired \(not finished within its 24 h window\) \(5 of 12 requests answered\)",
            "failed": r"batch batch_1 failed: invalid_request: The model is not available for batch requests\. "
            r"\(0 of 12 requests answered\)",
        }[outcome]
        with pytest.raises(LLMJudgeError, match=expected + r"\. The answers returned are cached .* only the missing"):
            j.judge(groups)
        answered = 5 if outcome == "expired" else 0
        assert len(JudgeCache(tmp_path).keys()) == answered and records(tmp_path) == []

        srv.batch_outcome = "completed"
        j2 = make_judge(srv.base_url, tmp_path, batch=True, batch_poll_s=0.02)
        assert all(v.status == "ok" for v in j2.judge(groups))
        cached_first = {json.loads(x)["custom_id"] for x in _input_lines(srv, "batch_1")[:answered]}
        assert sorted(input_ids(srv, "batch_2")) == sorted(set(k.values()) - cached_first)


def _input_lines(srv: FakeOpenAI, batch_id: str) -> list[str]:
    return srv.files[srv.batches[batch_id]["input_file_id"]]["data"].decode().splitlines()


def test_a_batch_cancelled_by_its_owner_fails_the_stage_with_its_partial_answers_kept(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    groups = make_groups(3)
    write_inputs(tmp_path, groups)
    with FakeOpenAI(KEY) as srv:
        srv.batch_hold, srv.batch_partial = True, 4
        write_params(tmp_path, batch_params(srv, tmp_path / "cache", batch_timeout_s=0.3))
        with pytest.raises(LLMJudgeError, match="not finished"):
            run_stage_inprocess(tmp_path, monkeypatch)
        openai.OpenAI(api_key=KEY, base_url=srv.base_url).batches.cancel("batch_1")  # e.g. from the dashboard
        write_params(tmp_path, batch_params(srv, tmp_path / "cache"))
        with pytest.raises(LLMJudgeError, match=r"batch batch_1 was cancelled \(4 of 12 requests answered\)"):
            run_stage_inprocess(tmp_path, monkeypatch)
        assert len(JudgeCache(tmp_path / "cache").keys()) == 4 and records(tmp_path / "cache") == []
        assert "resuming batch batch_1 (cancelled" in caplog.text

        srv.batch_hold = False
        m = run_stage_inprocess(tmp_path, monkeypatch)["llm"]
        assert srv.calls("batches.create") == ["batch_1", "batch_2"] and len(input_ids(srv, "batch_2")) == 8
        assert (m["cache_hits"], m["calls"], m["batch"]["batch_ids"]) == (4, 8, ["batch_2"])
    assert_expected_scores(tmp_path, 3)


def test_a_result_file_gone_at_the_provider_leaves_its_requests_to_a_new_batch(tmp_path):
    groups = make_groups(2)
    with FakeOpenAI(KEY) as srv:
        srv.batch_hold = True
        params = {"batch": True, "batch_poll_s": 0.02, "batch_timeout_s": 0.2, "max_failed_fraction": 1.0}
        with pytest.raises(LLMJudgeError, match="not finished"):
            make_judge(srv.base_url, tmp_path, **params).judge(groups)
        srv.batch_hold = False
        srv._advance(srv.batches["batch_1"])  # it completes while nobody waits, and its output file expires
        del srv.files[srv.batches["batch_1"]["output_file_id"]]
        j = make_judge(srv.base_url, tmp_path, **params)
        verdicts = j.judge(groups)
        assert all(v.status == "failed" for v in verdicts) and j.metrics["failure_reasons"] == {"batch_missing": 8}
        assert records(tmp_path) == [] and srv.calls("batches.create") == ["batch_1"]
        assert all(v.status == "ok" for v in make_judge(srv.base_url, tmp_path, **params).judge(groups))
        assert srv.calls("batches.create") == ["batch_1", "batch_2"] and len(input_ids(srv, "batch_2")) == 8


def test_a_rejected_key_fails_the_batch_run_without_showing_it(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI("sk-the-right-one") as srv:  # echoes the wrong Authorization header back
        with pytest.raises(LLMJudgeError) as e:
            make_judge(srv.base_url, tmp_path, batch=True).judge(make_groups(1))
    shown = str(e.value) + caplog.text
    assert "AuthenticationError (HTTP 401)" in str(e.value) and "Incorrect API key" in str(e.value)
    assert KEY not in shown and KEY[8:] not in shown and srv.calls("files.create") == []


# ----------------------------------------------------------------------------- vLLM's batch runner (real)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")


@pytest.mark.slow
@needs_vllm
def test_vllm_run_batch_accepts_our_file_and_its_output_fills_the_cache(tmp_path, tiny_model_dir):
    """Our request file through ``vllm run_batch`` on a tiny random model (JSON schema enforced by xgrammar, so
    its answers parse), and its output file read back into the answer cache and verdicts."""
    groups = make_groups(3, n_cands=2)
    params = dict(model=str(tiny_model_dir), batch=True, max_tokens=16, api_key_env=None)
    judge = make_judge("http://127.0.0.1:9/v1", tmp_path / "cache", **params)
    reqs = judge.plan(groups)
    (tmp_path / "in.jsonl").write_text("".join(request_line(r.key, judge.client.body(r, True)) + "\n" for r in reqs))
    env = {
        **os.environ,
        # vLLM's CPU build on a small machine (as pipeline.generation.vllm_backend.environment sets them)
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_USE_AOT_COMPILE": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache"),
    }
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.run_batch"),
        *("-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")),
        *("--model", str(tiny_model_dir), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"),
        *("--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "out.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(r.key for r in reqs)  # every request accepted
    assert all(x["error"] is None and x["response"]["status_code"] == 200 for x in lines)

    results: dict[str, Outcome] = {}
    again = judge.sender.absorb([("out.jsonl", text)], "vllm", [r.key for r in reqs], {r.key: r for r in reqs}, results)
    assert again == [] and all(results[r.key].answer is not None for r in reqs)
    assert judge.stats.batch_prompt_tokens > 0 and judge.stats.calls == len(reqs)
    assert len(JudgeCache(tmp_path / "cache").keys()) == len(reqs)

    # the verdicts come from the cache: nothing is sent (nothing listens on the endpoint)
    fresh = make_judge("http://127.0.0.1:9/v1", tmp_path / "cache", **params)
    verdicts = fresh.judge(groups)
    assert fresh.stats.cache_hits == len(reqs) and fresh.stats.failed_requests == 0 and fresh.stats.calls == 0
    key = {(r.meta["prompt_id"], r.meta["candidate_idx"]): r.key for r in reqs}
    for v in verdicts:
        assert v.status in ("ok", "tie")
        assert {s.idx: s.score for s in v.scores} == {
            s.idx: results[key[v.prompt_id, s.idx]].answer["score"] for s in v.scores
        }
