"""Shared by the LLM judge's tests (tests/judging/test_llm_*.py): prompts and candidates marked for the fake
server (tests/fake_openai_server.py), the judge's params from the repository's params.yaml, and the stage run
in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml
from repo_utils import PROJECT as REPO
from repo_utils import repo_params

from pipeline.io import write_table
from pipeline.judging.cache import CACHE_ENV
from pipeline.judging.llm.judge import LLMJudge
from pipeline.judging.registry import get_judge
from pipeline.judging.types import CandidateView, Group
from pipeline.settings.judge import LLMJudgeParams

KEY = "sk-test-SECRET-7f3a9c1e5b"
KEY_ENV = "DPO_TEST_JUDGE_KEY"
MODEL = "gpt-4o-2024-08-06"
PRICES = {MODEL: {"input_per_1k": 0.0025, "output_per_1k": 0.01}}


def q_of(i: int, j: int) -> int:
    """The rubric score the fake server gives candidate j of prompt i (distinct within a group)."""
    return (i + j) % 5 + 1


def make_groups(n_prompts: int, n_cands: int = 4) -> list[Group]:
    return [
        Group(
            f"p{i}",
            f"qid=p{i} What is {i} + 2? Give the final answer as 'Answer: <number>'.",
            str(i + 2),
            tuple(
                CandidateView(j, f"cid=p{i}-c{j} q={q_of(i, j)} {i} + 2 = {i + j}\nAnswer: {i + j}", 10 + j, "stop")
                for j in range(n_cands)
            ),
        )
        for i in range(n_prompts)
    ]


def write_inputs(root: Path, groups: list[Group]) -> None:
    prompts = pl.DataFrame(
        [
            {
                "prompt_id": g.prompt_id,
                "split": "train",
                "question": g.question,
                "prompt": g.question,
                "answer": g.answer,
                "solution": None,
                "source": "test",
            }
            for g in groups
        ],
        schema_overrides={"solution": pl.String},
    )
    cands = pl.DataFrame(
        [
            {
                "prompt_id": g.prompt_id,
                "candidate_idx": c.idx,
                "text": c.text,
                "token_ids": [1, 2],
                "num_tokens": c.num_tokens,
                "logprob_sum": -1.0,
                "finish_reason": c.finish_reason,
                "source": "policy",
                "model": "m",
            }
            for g in groups
            for c in g.candidates
        ]
    )
    write_table(prompts, root / "data/prompts.parquet", "prompts")
    write_table(cands, root / "data/candidates.parquet", "candidates")
    write_table(cands.clear(), root / "data/candidates_other.parquet", "candidates")  # scenarios 1-2: empty


def llm_params(base_url: str, cache_dir: Path, **kw) -> dict:
    return {
        **repo_params()["judge"]["llm"],
        "mode": "rubric",
        "model": MODEL,
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "cache_dir": str(cache_dir),
        "timeout_s": 0.5,
        "max_retries": 3,
        "max_in_flight": 4,
        "max_parse_retries": 2,
        "prices": PRICES,
        **kw,
    }


def write_params(root: Path, llm: dict) -> Path:
    params = repo_params()
    params["judge"].update(backend="llm", llm=llm)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_judge(base_url: str, cache_dir: Path, **kw) -> LLMJudge:
    return get_judge(
        "llm", min_gap=repo_params()["judge"]["min_gap"], llm=LLMJudgeParams(**llm_params(base_url, cache_dir, **kw))
    )


def run_stage_inprocess(root: Path, monkeypatch, *extra: str) -> dict:
    from stages import judge as stage

    monkeypatch.chdir(root)
    stage.main(["--params", str(root / "params.yaml"), *extra])
    metrics = root / "metrics/judge.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def all_text_under(*roots: Path) -> str:
    out = []
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out.append(p.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(out)


def stage_proc(root: Path, log_name: str, **env) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, KEY_ENV)}
    full_env.update(PYTHONPATH=str(REPO), **{KEY_ENV: KEY}, **env)
    return subprocess.Popen(
        [sys.executable, "-m", "stages.judge"],
        cwd=root,
        env=full_env,
        stdout=open(root / f"{log_name}.out", "wb"),
        stderr=subprocess.STDOUT,
    )
