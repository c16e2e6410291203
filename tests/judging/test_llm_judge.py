"""The LLM judge (pipeline/judging/llm/) against a real HTTP server on loopback (tests/fake_openai_server.py):
faults, retries, the answer cache, a SIGKILLed stage resumed, position bias, dry run, and the API key kept
secret. Settings not under test come from the repository's params.yaml."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
import traceback

import polars as pl
import pytest
from fake_openai_server import FakeOpenAI
from fresh_process import value_in_fresh_process
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

from pipeline.judging.cache import CACHE_ENV, FORMAT, JudgeCache, cache_key
from pipeline.judging.llm.client import LLMJudgeError
from pipeline.judging.llm.metrics import rubric_rates
from pipeline.judging.types import CandidateView, Group


@pytest.fixture(autouse=True)
def _no_cache_override(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)


# ----------------------------------------------------------------------------- cache key
def test_cache_key_covers_every_ingredient(tmp_path):
    j = make_judge("http://127.0.0.1:9/v1", tmp_path)
    g = make_groups(1)[0]
    base = j.rubric_request(g, g.candidates[0]).key
    assert base == make_judge("http://127.0.0.1:9/v1", tmp_path / "other").rubric_request(g, g.candidates[0]).key
    variants = [
        make_judge("x", tmp_path, model="other-model").rubric_request(g, g.candidates[0]).key,
        make_judge("x", tmp_path, temperature=0.7).rubric_request(g, g.candidates[0]).key,
        make_judge("x", tmp_path, max_tokens=17).rubric_request(g, g.candidates[0]).key,
        make_judge("x", tmp_path, show_reference=False).rubric_request(g, g.candidates[0]).key,
        j.rubric_request(g, g.candidates[1]).key,
        j.rubric_request(Group(g.prompt_id, g.question + " ", g.answer, g.candidates), g.candidates[0]).key,
        j.listwise_request(g, [0, 1, 2, 3]).key,
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert j.listwise_request(g, [0, 1, 2, 3]).key != j.listwise_request(g, [1, 0, 2, 3]).key  # shown order
    assert len(base) == 64


def test_cache_key_is_the_sha256_of_the_canonical_json_in_any_process():
    """Cached answers outlive the process and are shared by parallel runs: a key depends on the material
    alone (not on the order of its keys, nor on the process's hash salt), and a change of the recipe, which
    orphans every cached answer, comes with a new ``FORMAT``."""
    material = {"model": "m", "messages": [{"role": "user", "content": "¿Cuánto es 2 + 3?"}], "temperature": 0.0}
    # The canonical JSON written out by hand: keys sorted at every level, no whitespace, UTF-8 kept (not escaped)
    text = (
        '{"cache_format":' + str(FORMAT) + ',"messages":[{"content":"¿Cuánto es 2 + 3?","role":"user"}],"model":"m",'
        '"temperature":0.0}'
    )
    expected = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert cache_key(material) == expected
    assert cache_key(dict(reversed(material.items()))) == expected
    for hash_seed in (1, 2):
        assert (
            value_in_fresh_process(
                "from pipeline.judging.cache import cache_key", f"cache_key({material!r})", hash_seed
            )
            == expected
        )


# ----------------------------------------------------------------------------- faults through the stage
FAULTS = {
    "p0-c0": ["429"],
    "p0-c1": ["500", "500"],
    "p0-c2": ["hang"],
    "p1-c0": ["badbody"],
    "p1-c1": ["prose"],
    "p1-c2": ["range"],
    "p1-c3": ["textscore"],
    "p2-c0": ["500", "range"],
}
EXPECTED_CALLS = {"p0-c0": 2, "p0-c1": 3, "p0-c2": 2, "p1-c0": 2, "p1-c1": 2, "p1-c2": 2, "p2-c0": 3}


def test_stage_with_injected_faults_completes_caches_and_rerun_sends_nothing(tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    groups = make_groups(3)
    write_inputs(tmp_path, groups)
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAI(KEY, faults=FAULTS, hang_s=2.0, retry_after="1") as srv:
        write_params(tmp_path, llm_params(srv.base_url, tmp_path / "cache"))
        metrics = run_stage_inprocess(tmp_path, monkeypatch)

        # every candidate judged; each fault cost exactly the requests it should, nothing else repeated
        counts = srv.counts()
        expected = {f"p{i}-c{j}": EXPECTED_CALLS.get(f"p{i}-c{j}", 1) for i in range(3) for j in range(4)}
        assert dict(counts) == expected
        assert all(n == 1 for n in srv.answered().values()) and len(srv.answered()) == 12
        log = srv.requests()
        assert all(r["temperature"] == 0.0 and r["max_tokens"] == 64 and r["structured"] for r in log)
        # the 429's Retry-After: 1 was honoured (the client's own backoff would wait <= 0.5 s)
        t429 = [r["t"] for r in log if r["content_id"] == "p0-c0"]
        assert t429[1] - t429[0] >= 0.9
        scores = pl.read_parquet(tmp_path / "data/judge/scores.parquet")
        sel = pl.read_parquet(tmp_path / "data/judge/selections.parquet")
        assert len(scores) == 12 and scores["score"].is_between(1, 5).all()
        assert {(r["prompt_id"], r["candidate_idx"]): r["score"] for r in scores.iter_rows(named=True)} == {
            (f"p{i}", j): float(q_of(i, j)) for i in range(3) for j in range(4)
        }
        for r in sel.iter_rows(named=True):  # best = highest rubric score, worst = lowest
            i = int(r["prompt_id"][1:])
            qs = [q_of(i, j) for j in range(4)]
            assert (r["best_idx"], r["worst_idx"], r["status"]) == (qs.index(max(qs)), qs.index(min(qs)), "ok")
        llm = metrics["llm"]
        assert metrics["failed_candidates"] == 0 and metrics["dropped_failed"] == 0
        assert llm["parse_failures"] == 4 and llm["failed_requests"] == 0 and llm["cache_hits"] == 0
        assert llm["calls"] == 12 + 4 and llm["prompt_tokens"] > 0 and llm["completion_tokens"] > 0
        assert llm["cost_usd"] == pytest.approx(
            llm["prompt_tokens"] / 1000 * 0.0025 + llm["completion_tokens"] / 1000 * 0.01, abs=1e-6
        )
        first = {
            p: (tmp_path / "data/judge" / p).read_bytes()
            for p in ("scores.parquet", "selections.parquet", "llm_judgements.jsonl")
        }

        # rerun after success: no request at all, same outputs
        mark = srv.mark()
        metrics2 = run_stage_inprocess(tmp_path, monkeypatch)
        assert srv.mark() == mark
        assert metrics2["llm"]["cache_hits"] == 12 and metrics2["llm"]["calls"] == 0
        # the cache saved what the 12 valid answers cost (less than run 1, which also paid for 4 bad ones)
        assert metrics2["llm"]["cost_usd"] == 0 and 0 < metrics2["llm"]["cost_usd_saved_by_cache"] < llm["cost_usd"]
        for p, data in first.items():
            assert (tmp_path / "data/judge" / p).read_bytes() == data, p

    # the key is in none of params, outputs, metrics, cache, logs or printed text
    text = all_text_under(tmp_path) + caplog.text + "".join(capsys.readouterr())
    assert "Retrying request" in caplog.text  # the client's retry did run and was logged
    assert KEY not in text and KEY[8:] not in text


def test_permanent_failure_policy_and_failures_are_retried_on_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    groups = make_groups(3)
    faults = {"p1-c2": ["range"] * 3, "p2-c0": ["500"] * 2}
    with FakeOpenAI(KEY, faults={k: list(v) for k, v in faults.items()}) as srv:
        j = make_judge(srv.base_url, tmp_path / "c1", max_retries=1, on_failure="drop_group")
        v = {x.prompt_id: x for x in j.judge(groups)}
        assert srv.counts()["p1-c2"] == 3  # 1 + max_parse_retries, then a failure
        assert srv.counts()["p2-c0"] == 2  # 1 + the client's max_retries
        assert (v["p1"].status, v["p1"].best, v["p1"].worst) == ("failed", None, None)
        assert v["p1"].scores[2].score is None and v["p1"].extra["failures"] == {"2": "malformed_answer"}
        assert v["p2"].status == "failed" and v["p2"].extra["failures"] == {"0": "http_500"}
        assert v["p0"].status == "ok"
        m = j.metrics
        assert (m["failed_requests"], m["parse_failures"], m["api_failures"]) == (2, 3, 1)
        assert m["failure_reasons"] == {"http_500": 1, "malformed_answer": 1}

        # failures are not cached: the rerun asks again for exactly those two, and they now succeed
        mark = srv.mark()
        j2 = make_judge(srv.base_url, tmp_path / "c1", on_failure="drop_group")
        v2 = {x.prompt_id: x for x in j2.judge(groups)}
        assert sorted(srv.counts(mark).elements()) == ["p1-c2", "p2-c0"]
        assert all(x.status == "ok" for x in v2.values())

        # ignore_failed: the group is judged on the candidates that did get a score
        srv.faults = {"p1-c2": ["range"] * 3}
        v3 = {
            x.prompt_id: x for x in make_judge(srv.base_url, tmp_path / "c2", on_failure="ignore_failed").judge(groups)
        }
        assert v3["p1"].status == "ok" and v3["p1"].scores[2].score is None
        assert {v3["p1"].best, v3["p1"].worst} <= {0, 1, 3}

        # too many failures: abort without a verdict, keeping the answers for the rerun
        srv.faults = {"p0-c0": ["range"] * 3}
        j4 = make_judge(srv.base_url, tmp_path / "c3", max_failed_fraction=0.0)
        with pytest.raises(LLMJudgeError, match="max_failed_fraction"):
            j4.judge(groups)
        assert len(JudgeCache(tmp_path / "c3").keys()) == 11


def test_structured_output_refused_falls_back_to_text(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    groups = make_groups(2)
    with FakeOpenAI(KEY, reject_structured=True) as srv:
        # a generous timeout: a client retry after a slow answer (seen on a loaded machine) is a 9th request
        j = make_judge(srv.base_url, tmp_path, max_in_flight=2, timeout_s=10)
        v = j.judge(groups)
        assert all(x.status == "ok" for x in v) and j.metrics["structured_output"] is False
        plain = [r for r in srv.requests() if not r["structured"]]
        assert len(plain) == 8 and all(r["answered"] for r in plain)
        assert sum(r["structured"] for r in srv.requests()) <= 2  # at most the requests already in flight


def test_listwise_position_bias_metric(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    groups = make_groups(24)
    with FakeOpenAI(KEY, listwise_policy="first") as srv:
        j = make_judge(srv.base_url, tmp_path / "a", mode="listwise")
        j.judge(groups)
        bias = j.metrics["position_bias"]
        assert len(srv.requests()) == 24
    assert bias["best_first_rate"] == 1.0 and bias["best_first_excess"] == pytest.approx(0.75)
    assert bias["worst_last_rate"] == 1.0 and bias["best_position_counts"] == [24, 0, 0, 0]

    with FakeOpenAI(KEY, listwise_policy="content") as srv:
        j = make_judge(srv.base_url, tmp_path / "b", mode="listwise")
        verdicts = j.judge(groups)
        bias = j.metrics["position_bias"]
    assert bias["best_first_rate"] < 0.5 and abs(bias["best_first_excess"]) < 0.25
    orders = {tuple(v.extra["shown_order"]) for v in verdicts}
    assert len(orders) > 5  # shuffled, and recorded
    for v, g in zip(verdicts, groups):  # positions mapped back to the right candidates
        qs = [q_of(int(g.prompt_id[1:]), c.idx) for c in g.candidates]
        assert (v.best, v.worst, v.status) == (qs.index(max(qs)), qs.index(min(qs)), "ok")
        assert v.scores[v.best].score == 1.0 and v.scores[v.worst].score == -1.0


def test_dry_run_sends_nothing_and_counts_cached(tmp_path, monkeypatch, capsys):
    groups = make_groups(3)
    write_inputs(tmp_path, groups)
    with FakeOpenAI(KEY) as srv:
        write_params(tmp_path, llm_params(srv.base_url, tmp_path / "cache"))
        run_stage_inprocess(tmp_path, monkeypatch, "--dry-run")  # no key needed to count
        out = capsys.readouterr().out
        plan = json.loads(out.strip().splitlines()[-1])["dry_run"]
        assert srv.mark() == 0 and not (tmp_path / "data/judge").exists()
        assert (plan["requests"], plan["to_send"], plan["cached"]) == (12, 12, 0)
        assert plan["est_input_tokens"] > 12 * 100 and plan["max_output_tokens"] == 12 * 64
        assert plan["est_cost_usd"] > 0 and "12 requests to send" in out

        monkeypatch.setenv(KEY_ENV, KEY)
        make_judge(srv.base_url, tmp_path / "cache").judge(groups[:1])
        write_params(tmp_path, llm_params(srv.base_url, tmp_path / "cache", dry_run=True))
        run_stage_inprocess(tmp_path, monkeypatch)
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dry_run"]
        assert (plan["to_send"], plan["cached"]) == (8, 4) and srv.mark() == 4


def test_rejected_key_is_fatal_and_never_shown(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeOpenAI("sk-the-right-one") as srv:  # echoes the wrong Authorization header back
        j = make_judge(srv.base_url, tmp_path)
        with pytest.raises(LLMJudgeError) as e:
            j.judge(make_groups(2))
    shown = "".join(traceback.format_exception(e.value)) + caplog.text
    assert "AuthenticationError" in shown and "401" in shown
    assert KEY not in shown and KEY[8:] not in shown
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LLMJudgeError, match=KEY_ENV):
        make_judge("http://127.0.0.1:9/v1", tmp_path).judge(make_groups(1))


def test_score_candidates_and_rubric_rates_for_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    gens = [
        Group(f"t{i}", f"qid=t{i} q?", "1", (CandidateView(0, f"cid=t{i}-c0 q={s} Answer: 1", 5, "stop"),))
        for i, s in enumerate([5, 5, 4, 3, 1])
    ]
    with FakeOpenAI(KEY) as srv:
        j = make_judge(srv.base_url, tmp_path, mode="listwise")  # evaluate scores with the rubric anyway
        scores = j.score_candidates(gens)
        assert len(srv.requests()) == 5
    assert scores == {("t0", 0): 5.0, ("t1", 0): 5.0, ("t2", 0): 4.0, ("t3", 0): 3.0, ("t4", 0): 1.0}
    rates = rubric_rates(scores.values())
    assert rates["five_point_rate"] == pytest.approx(0.4) and rates["four_five_point_rate"] == pytest.approx(0.6)
    assert rubric_rates([5, None, 3])["five_point_rate"] == 0.5 and rubric_rates([])["five_point_rate"] is None


# ----------------------------------------------------------------------------- kill and resume
def test_sigkill_mid_run_then_rerun_repeats_no_answered_request(tmp_path):
    groups = make_groups(8)
    a, b = tmp_path / "a", tmp_path / "b"
    logs = tmp_path / "logs"
    for d in (a, b, logs):
        d.mkdir()
    write_inputs(a, groups)
    write_inputs(b, groups)
    with FakeOpenAI(KEY, delay=0.15) as srv:
        write_params(a, llm_params(srv.base_url, tmp_path / "cache_a", max_in_flight=2))
        write_params(b, llm_params(srv.base_url, tmp_path / "cache_b", max_in_flight=2))
        cache_a = JudgeCache(tmp_path / "cache_a")

        proc = stage_proc(a, "../logs/run1")
        deadline = time.monotonic() + 60
        while len(cache_a.keys()) < 6:
            assert proc.poll() is None, "the stage finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        cached = {
            f"{r['meta']['prompt_id']}-c{r['meta']['candidate_idx']}" for r in (cache_a.get(k) for k in cache_a.keys())
        }
        assert 6 <= len(cached) < 32 and not (a / "data/judge/selections.parquet").exists()
        answered_run1 = srv.answered()

        mark = srv.mark()
        proc = stage_proc(a, "../logs/run2", DPO_LOG_LEVEL="DEBUG")
        assert proc.wait(60) == 0, (logs / "run2.out").read_text()
        run2 = srv.counts(mark)
        assert not set(run2) & cached  # nothing answered and cached was asked again
        assert sum(run2.values()) == 32 - len(cached)
        # only requests in flight at the kill (answered by the server, never received) may repeat
        assert sum(1 for k, n in (answered_run1 + srv.answered(mark)).items() if n > 1) <= 2
        assert len(cache_a.keys()) == 32

        mark = srv.mark()
        proc = stage_proc(b, "../logs/uninterrupted")
        assert proc.wait(60) == 0, (logs / "uninterrupted.out").read_text()
        assert sum(srv.counts(mark).values()) == 32

        mark = srv.mark()
        proc = stage_proc(a, "../logs/run3")
        assert proc.wait(60) == 0 and srv.mark() == mark  # rerun after success: no request

    for p in ("scores.parquet", "selections.parquet", "llm_judgements.jsonl"):
        assert (a / "data/judge" / p).read_bytes() == (b / "data/judge" / p).read_bytes(), p
    sel = pl.read_parquet(a / "data/judge/selections.parquet")
    assert len(sel) == 8 and (sel["status"] == "ok").all()
    text = all_text_under(tmp_path)
    assert "Sending HTTP Request" in text  # run2 logged at DEBUG
    assert KEY not in text and KEY[8:] not in text


def test_evaluation_rubric_eval_over_greedy_generations(tmp_path, monkeypatch):
    from pipeline.judging.llm.metrics import rubric_eval

    monkeypatch.setenv(KEY_ENV, KEY)
    prompts = pl.DataFrame([{"prompt_id": f"e{i}", "prompt": f"qid=e{i} what?", "answer": "1"} for i in range(4)])
    gens = pl.DataFrame(
        [
            {
                "prompt_id": f"e{i}",
                "model": "dpo",
                "text": f"cid=e{i}-c0 q={s} Answer: 1",
                "extracted_answer": "1",
                "correct": True,
            }
            for i, s in enumerate([5, 4, 2, 7])
        ]
    )
    with FakeOpenAI(KEY, faults={"e3-c0": ["range"] * 10}) as srv:  # e3: an out-of-range score, every time
        out = rubric_eval(make_judge(srv.base_url, tmp_path), gens, prompts)
    assert out["n_scored"] == 3 and out["failed"] == 1
    assert out["five_point_rate"] == pytest.approx(1 / 3) and out["four_five_point_rate"] == pytest.approx(2 / 3)
