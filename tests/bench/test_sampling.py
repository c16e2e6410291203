"""`python -m pipeline.bench.sampling --quick`: the transformers backend through the sample stage's sampler,
on a tiny random model, with params.yaml's decoding settings and prompts. vLLM's engine takes a minute to
start on a CPU: its path is left to a full run (and the vLLM backend's own tests)."""

from __future__ import annotations

import json

from repo_utils import write_params

from pipeline.bench import sampling
from pipeline.settings.params import Params


def test_quick_run_samples_with_params_settings(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert sampling.main(["--quick", "--threads", "1", "--out", "bench.json"]) == 0
    out = json.loads((tmp_path / "bench.json").read_text())
    cfg = Params.load("params.yaml")
    quick = sampling.QUICK
    assert out["bench"] == "sampling" and list(out["results"]) == ["transformers"]
    args = out["args"]
    assert (args["prompts"], args["n"], args["max_new_tokens"]) == (quick.prompts, quick.n, quick.max_new_tokens)
    assert (args["temperature"], args["dtype"], args["batch_size"]) == (
        cfg.sample.temperature,
        cfg.policy.dtype,
        cfg.sample.batch_size,
    )
    assert out["generation"] == {
        "n": quick.n,
        "temperature": cfg.sample.temperature,
        "top_p": cfg.sample.top_p,
        "max_new_tokens": quick.max_new_tokens,
        "seed": cfg.sample.seed,
    }
    assert out["vllm"] == cfg.vllm.model_dump()
    result = out["results"]["transformers"]
    assert result["sequences"] == quick.prompts * quick.n
    assert 0 < result["tokens"] <= result["sequences"] * quick.max_new_tokens
    assert result["tok_per_s"] > 0 and result["end_to_end_s"] >= result["startup_s"] + result["wall_s"]


def test_prompts_are_params_problems_with_its_instruction(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", {"prepare": {"instruction": " Reply with 'Answer: <n>' only."}})
    monkeypatch.chdir(tmp_path)
    assert sampling.main(["--prompts", "5", "--warmup-prompts", "2", "--write-prompts", "prompts.json"]) == 0
    prompts = json.loads((tmp_path / "prompts.json").read_text())
    assert len(prompts) == 7 == len(set(prompts))
    assert all(p.endswith(" Reply with 'Answer: <n>' only.") and "arithmetic problem" in p for p in prompts)
