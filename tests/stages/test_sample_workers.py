"""Sampling shared by several processes on loopback: `python -m stages.sample --worker` processes and the stage
work through one chunk folder; a worker killed in the middle of a chunk has that chunk sampled by the next
process; the stage's candidates file is byte-identical to the one a stage sampling alone writes.
Transformers here; vLLM's CPU build in the slow test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from repo_utils import PROJECT, repo_params

from pipeline.io import read_json, write_table
from pipeline.model.loading import load_model, load_tokenizer, save_model

needs_vllm = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None,
    reason="vLLM not installed (scripts/setup.sh installs the CPU build)",
)


def workspace(root: Path, model_dir: Path, sample: dict, vllm: dict | None = None) -> Path:
    """A stage workspace with the policy, 12 train prompts, and two params files that differ only in the chunk
    folder: params-alone.yaml (the stage alone) and params-shared.yaml (the stage and its workers)."""
    (root / "models").mkdir(parents=True)
    save_model(load_model(model_dir, "float32"), load_tokenizer(model_dir), root / "models/policy", {"source": "tiny"})
    rows = [
        {
            "prompt_id": f"p{i:02d}",
            "split": "train",
            "question": f"{i} + {2 * i}",
            "prompt": f"What is {i} + {2 * i}?" + " Think step by step." * (i % 3),
            "answer": str(3 * i),
            "solution": None,
            "source": "test",
        }
        for i in range(12)
    ]
    write_table(pl.DataFrame(rows), root / "data/prompts.parquet", "prompts")
    for name in ("alone", "shared"):
        params = repo_params({"sample": {**sample, "cache_dir": f".cache/{name}"}, "vllm": vllm or {}})
        (root / f"params-{name}.yaml").write_text(yaml.safe_dump(params))
    return root


def command(params: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.sample", "--source", "policy", "--params", params, *extra]


def start(root: Path, params: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.Popen(
        command(params, *extra), cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen, timeout: float) -> str:
    _, err = proc.communicate(timeout=timeout)
    log = err.decode()
    assert proc.returncode == 0, log[-3000:]
    return log


def alive(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""


def kill_in_a_chunk(proc: subprocess.Popen, folder: Path, timeout: float) -> str:
    """SIGKILL ``proc`` once it has finished a chunk, while it holds a lease on one it has not finished; the
    key of that chunk."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive(proc)
        if not list(folder.glob("chunk-*.parquet")):
            time.sleep(0.01)
            continue
        for lease in folder.glob("chunk-*.lease-0"):
            key = lease.name.removeprefix("chunk-").split(".lease-")[0]
            proc.send_signal(signal.SIGSTOP)  # hold still, then check the chunk is still unfinished
            if lease.exists() and not (folder / f"chunk-{key}.parquet").exists():
                proc.kill()
                proc.wait()
                return key
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"no lease appeared in {folder} within {timeout} s")


def check_workers_against_alone(root: Path, run_stage, timeout: float) -> dict:
    """The stage alone; then worker A, killed in its second chunk or later; worker B, which samples A's unfinished
    chunk again, and the stage beside it: the same bytes. Returns the shared run's metrics."""
    run_stage("params-alone.yaml")
    alone = (root / "data/candidates.parquet").read_bytes()
    (root / "data/candidates.parquet").unlink()
    folder = root / ".cache/shared/policy"

    orphan = kill_in_a_chunk(start(root, "params-shared.yaml", "--worker"), folder, timeout)
    assert list(folder.glob(f"chunk-{orphan}.lease-*")) and not (folder / f"chunk-{orphan}.parquet").exists()
    worker = start(root, "params-shared.yaml", "--worker")
    deadline = time.time() + timeout
    while not (folder / f"chunk-{orphan}.parquet").exists():  # B takes A's chunk over: A is dead
        alive(worker)
        assert time.time() < deadline, f"worker B did not sample chunk {orphan} within {timeout} s"
        time.sleep(0.01)
    run_stage("params-shared.yaml")
    log = finish(worker, timeout)

    assert (root / "data/candidates.parquet").read_bytes() == alone
    assert not list(folder.glob("*.lease-*"))
    assert "worker: every chunk in" in log
    assert f"taking over chunk {orphan}" in log  # B, not A, sampled it
    return read_json(root / "metrics/sample.json")


SAMPLE = {"n": 2, "temperature": 1.0, "max_new_tokens": 12, "chunk_size": 2, "logprob_check": 4, "lease_s": 2}


def test_workers_and_the_stage_write_the_file_the_stage_writes_alone(tmp_path, tiny_model_dir, monkeypatch):
    """Transformers, the stage in this process (no start-up to wait for), the workers as processes."""
    from stages import sample

    root = workspace(tmp_path, tiny_model_dir, {**SAMPLE, "backend": "transformers", "batch_size": 4})
    monkeypatch.chdir(root)
    m = check_workers_against_alone(root, lambda params: sample.main(["--params", params]), timeout=240)
    assert m["resume"]["chunks"] == 6 and m["resume"]["chunks_reused"] >= 2  # A's and B's chunks


@pytest.mark.slow
@needs_vllm
def test_workers_and_the_stage_on_vllm_write_the_file_the_stage_writes_alone(tmp_path, tiny_model_dir):
    """vLLM's CPU build: every role a process of its own, as on separate machines."""
    root = workspace(
        tmp_path,
        tiny_model_dir,
        {**SAMPLE, "backend": "vllm", "lease_s": 10},
        vllm={"max_model_len": 256, "max_num_seqs": 32, "cpu_kvcache_space_gb": 1},
    )
    m = check_workers_against_alone(root, lambda params: finish(start(root, params), 900), timeout=900)
    assert m["resume"]["chunks"] == 6 and m["resume"]["chunks_reused"] >= 2
