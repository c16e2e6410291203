"""Resumable sampling: finished chunks are kept, a rerun samples only the rest and gives the result
an uninterrupted run gives; the sample stage killed half-way resumes. (Several processes sharing the chunk
folder: tests/generation/test_chunk_store.py and tests/stages/test_sample_workers.py.)"""

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

from pipeline.generation.chunk_store import ChunkFolder
from pipeline.generation.resumable import plan_chunks, sample_chunks
from pipeline.generation.types import Candidate, GenerationSettings

S = GenerationSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)


class CountingSampler:
    """Deterministic candidates from the prompt text; counts the prompts it is asked for; can crash."""

    def __init__(self, crash_after_calls: int | None = None):
        self.prompts_seen: list[str] = []
        self.calls = 0
        self.crash_after = crash_after_calls

    def generate(self, prompts, settings, progress=None):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.prompts_seen += list(prompts)
        return [[Candidate(f"{p}/{k}", (len(p), k, 2), -1.5 * k, "stop") for k in range(settings.n)] for p in prompts]

    def close(self):
        pass


def run(sampler, prompts, cache, identity=None, chunk=3):
    ids = [f"id{i}" for i in range(len(prompts))]
    plan = plan_chunks(ids, prompts, S, chunk, identity or {"model": "m"})
    return sample_chunks(lambda: sampler, plan, ChunkFolder(cache, lease_s=60), collect=True, progress=None)


def test_a_crash_keeps_finished_chunks_and_the_rerun_samples_only_the_rest(tmp_path):
    prompts = [f"q{i}" for i in range(8)]  # chunks of 3: [0-2], [3-5], [6-7]
    whole, stats = run(CountingSampler(), prompts, tmp_path / "a")
    assert stats["chunks"] == 3 and stats["chunks_reused"] == 0

    crashing = CountingSampler(crash_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        run(crashing, prompts, tmp_path / "b")
    assert len(list((tmp_path / "b").glob("chunk-*.parquet"))) == 2
    assert not list((tmp_path / "b").glob("*.tmp*"))  # nothing half-written left behind
    assert not list((tmp_path / "b").glob("*.lease-*"))  # the failed chunk's claim is released

    resumed = CountingSampler()
    out, stats = run(resumed, prompts, tmp_path / "b")
    assert resumed.prompts_seen == ["q6", "q7"]  # only the unfinished chunk
    assert stats["chunks_reused"] == 2 and stats["prompts_reused"] == 6
    assert out == whole


def test_chunk_identity_covers_model_settings_and_prompts(tmp_path):
    prompts = [f"q{i}" for i in range(6)]
    run(CountingSampler(), prompts, tmp_path)
    s = CountingSampler()
    run(s, prompts, tmp_path, identity={"model": "other"})
    assert len(s.prompts_seen) == 6  # another model: nothing reused
    s = CountingSampler()
    run(s, [*prompts[:3], "changed", *prompts[4:]], tmp_path)
    assert s.prompts_seen == ["changed", "q4", "q5"]  # only the chunk whose prompts changed


def test_a_damaged_chunk_is_resampled(tmp_path):
    prompts = [f"q{i}" for i in range(3)]
    run(CountingSampler(), prompts, tmp_path)
    (chunk,) = tmp_path.glob("chunk-*.parquet")
    chunk.write_bytes(b"not parquet")
    s = CountingSampler()
    out, stats = run(s, prompts, tmp_path)
    assert s.prompts_seen == prompts and stats["chunks_reused"] == 0 and out[0][1].text == "q0/1"


def test_a_run_that_finds_every_chunk_finished_loads_no_model(tmp_path):
    prompts = [f"q{i}" for i in range(7)]
    whole, _ = run(CountingSampler(), prompts, tmp_path)

    def no_model():
        raise AssertionError("a model was loaded although every chunk is finished")

    plan = plan_chunks([f"id{i}" for i in range(7)], prompts, S, 3, {"model": "m"})
    out, stats = sample_chunks(no_model, plan, ChunkFolder(tmp_path, lease_s=60), collect=True, progress=None)
    assert out == whole and stats == {"chunks": 3, "chunks_reused": 3, "prompts_reused": 7}


def test_sample_stage_killed_half_way_resumes(tmp_path, tiny_model_dir):
    """The real stage on the tiny model: SIGKILL after the first chunk is saved, then rerun."""
    from pipeline.io import read_json, read_table, write_table
    from pipeline.model.loading import load_model, load_tokenizer, save_model

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"].update(
        backend="transformers",
        n=2,
        max_new_tokens=24,
        batch_size=4,
        chunk_size=4,
        logprob_check=4,
        cache_dir=".cache/samples",
        temperature=1.0,
    )  # relative: from the repository root
    params["policy"]["model"] = str(tiny_model_dir)
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    save_model(
        load_model(tiny_model_dir, "float32"),
        load_tokenizer(tiny_model_dir),
        work / "models/policy",
        {"source": "tiny"},
    )
    rows = [
        {
            "prompt_id": f"p{i:02d}",
            "split": "train",
            "question": f"{i} + 1",
            "prompt": f"What is {i} + 1?",
            "answer": str(i + 1),
            "solution": None,
            "source": "test",
        }
        for i in range(16)
    ]
    write_table(pl.DataFrame(rows), work / "data/prompts.parquet", "prompts")
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "stages.sample", "--source", "policy"]

    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cache = work / ".cache/samples/policy"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(cache.glob("chunk-*.parquet"))) < 1:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(cache.glob("chunk-*.parquet")))
    assert 1 <= done_before < 4 and not (work / "data/candidates.parquet").exists()

    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    m = read_json(work / "metrics/sample.json")
    assert m["resume"]["chunks"] == 4 and m["resume"]["chunks_reused"] >= done_before
    assert m["resume"]["cache_dir"] == ".cache/samples/policy"  # committed metrics: no machine path
    resumed = read_table(work / "data/candidates.parquet", "candidates")

    # the resumed table holds every prompt's candidates once (resumed == uninterrupted is tested above)
    assert resumed.group_by("prompt_id").len()["len"].to_list() == [2] * 16
    check = m["sampler_vs_training_logprob"]
    assert check["n"] == 4 and check["mean_abs_diff_per_token"] < 1e-3
