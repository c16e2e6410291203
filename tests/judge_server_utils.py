"""Helpers of the tests of the judge's own vLLM server (tests/judging/test_judge_server*.py): the
stage's inputs and params, the stand-in server's command line, the stage as a program, and finding the
processes a stage started (each inherits a tag put into the environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import yaml
from repo_utils import PROJECT as REPO
from repo_utils import repo_params

from pipeline.io import write_table
from pipeline.judging.cache import CACHE_ENV
from pipeline.judging.llm.server import server_command

STANDIN = REPO / "tests" / "standin_vllm_server.py"
TAG_ENV = "DPO_TEST_SERVER_TAG"  # inherited by every process a stage starts, so that a test can find them


def write_inputs(root: Path, n_prompts: int, n_cands: int) -> None:
    """Prompts and candidates of the judge stage: sums, the candidates right or wrong, with the fake
    server's markers (``qid=``, ``cid=``, ``q=<rubric score>``)."""
    prompts, cands = [], []
    for i in range(n_prompts):
        q = f"qid=p{i} What is {i} + 2? Give the final answer as 'Answer: <number>'."
        prompts.append({"prompt_id": f"p{i}", "split": "train", "question": q, "prompt": q, "answer": str(i + 2)})
        for j in range(n_cands):
            text = f"cid=p{i}-c{j} q={(i + j) % 5 + 1} {i} + 2 = {i + 2 * (j % 2)}\nAnswer: {i + 2 * (j % 2)}"
            cands.append(
                {
                    "prompt_id": f"p{i}",
                    "candidate_idx": j,
                    "text": text,
                    "token_ids": [1, 2],
                    "num_tokens": 10 + j,
                    "logprob_sum": -1.0,
                    "finish_reason": "stop",
                    "source": "policy",
                    "model": "m",
                }
            )
    table = pl.DataFrame(prompts).with_columns(solution=pl.lit(None, pl.String), source=pl.lit("test"))
    write_table(table, root / "data/prompts.parquet", "prompts")
    write_table(pl.DataFrame(cands), root / "data/candidates.parquet", "candidates")
    write_table(pl.DataFrame(cands).clear(), root / "data/candidates_other.parquet", "candidates")


def fake_model(root: Path) -> Path:
    """A folder that passes for a model where the server is a stand-in (only the fingerprint reads it)."""
    d = root / "judge_model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    return d


def judge_params(root: Path, model: Path | str, dtype: str = "float32", **llm) -> dict:
    """The repository's params with an LLM judge serving ``model`` (a folder or a builtin name), its
    cache under ``root``."""
    params = repo_params()
    params["judge"]["backend"] = "llm"
    params["judge"]["llm"].update(
        {
            "model": "judge",
            "base_url": None,
            "serve": {"model": str(model), "dtype": dtype},
            "cache_dir": str(root / "cache"),
            "max_in_flight": 2,
            **llm,
        }
    )
    params["judge"]["server"].update(startup_timeout_s=60)
    return params


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def standin_command(*args, **kwargs) -> list[str]:
    """vLLM's command line as the stage builds it, run by the stand-in server instead."""
    cmd = server_command(*args, **kwargs)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    return [sys.executable, str(STANDIN), *cmd[3:]]


def stage_process(root: Path, log: Path, standin: bool, **env: str) -> subprocess.Popen:
    """The judge stage as a program in ``root``, its output in ``log``; ``standin``: the stand-in
    server instead of vLLM's."""
    swap = (
        "from pipeline.judging.llm import server\n"
        "from judge_server_utils import standin_command\n"
        "server.server_command = standin_command\n"
        if standin
        else ""
    )
    code = (
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n{swap}"
        "from pipeline.cli import run_stage\nfrom stages import judge\nrun_stage(judge.main)\n"
    )
    full_env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    full_env.update(PYTHONPATH=str(REPO), **env)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes (but this one) whose environment carries ``tag``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG_ENV) == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def assert_none_left(tag: str, within_s: float = 0.0) -> None:
    """No process carries ``tag`` (waiting up to ``within_s``); any found is killed, then reported."""
    deadline = time.monotonic() + within_s
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    found = []
    for p in left:
        try:
            found.append((p.pid, p.cmdline()))
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    assert not found, f"processes left behind: {found}"


def vllm_servers() -> list[psutil.Process]:
    """vLLM api_server processes anywhere below this one."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def standin_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
