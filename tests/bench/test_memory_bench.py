"""`python -m pipeline.bench.memory_bench --quick`: the memory benchmark end to end on a tiny random model
(ours at a full fine-tune and at LoRA + checkpointing; TRL's configurations take a minute even at these
sizes and stay out of the default suite), its out-of-memory records and its verdicts."""

from __future__ import annotations

import json

from repo_utils import run_module, write_params

from pipeline.bench import memory_bench
from pipeline.bench.architectures import SMOLLM2_1_7B, SMOLLM2_360M, n_params
from pipeline.bench.process import MemoryLimits, child_env, run_child
from pipeline.settings.params import Params


def test_quick_run_trains_each_setting_and_records_its_memory(tmp_path):
    write_params(tmp_path / "params.yaml")
    # flash: ours in the kernel the flag names, not params' (math), the checkpoint's replay in it too
    args = ["--quick", "--threads", "1", "--profile", "40", "--cpu-attention", "flash", "--out", "memory.json"]
    proc = run_module("pipeline.bench.memory_bench", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "memory.json").read_text())
    cfg = Params.load(tmp_path / "params.yaml")
    assert out["bench"] == "memory" and list(out["architectures"]) == ["tiny"]
    assert out["settings"]["dtype"] == cfg.policy.dtype and out["environment"]["max_rss_mb"] > 0
    assert cfg.train.cpu_attention == "math" and out["settings"]["train"]["cpu_attention"] == "flash"
    tiny = out["architectures"]["tiny"]
    assert list(tiny["results"]) == list(memory_bench.QUICK.configs) == ["ours_full", "ours_lora_ckpt"]
    full, lora = tiny["results"]["ours_full"], tiny["results"]["ours_lora_ckpt"]
    for r in (full, lora):
        assert r["steps"] == memory_bench.QUICK.steps == len(r["step_s"])
        # --profile 40: the timed steps' top operators, a table torch.profiler writes
        assert "Self CPU" in r["profile"] and "aten::" in r["profile"]
        if out["environment"]["bf16_autocast"]:  # the kernel is chosen under bf16 autocast only
            assert "flash_attention" in r["profile"]  # the math kernel is bmm and softmax, no such operator
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["truncated_tokens"] == 0
        assert r["abs_peak_mb"] >= r["rss_loaded_mb"] > 0
        # the reference computed in the child, as the reference stage computes it: the first step finds it
        assert 0 <= r["ref_gap_per_token"] <= r["ref_gap_mean"] <= r["ref_gap_max"] <= 1e-3
        assert r["ref_check_tol"] == cfg.train.ref_check_tol
    assert full["trainable_parameters"] == full["parameters"] == tiny["n_params"]
    assert not full["gradient_checkpointing"] and lora["gradient_checkpointing"]
    assert 0 < lora["trainable_parameters"] < lora["parameters"] // 10  # the adapter alone trains
    assert tiny["comparison"] == {}  # no TRL configuration ran: nothing to compare


def test_a_configuration_whose_weights_cannot_fit_is_not_started(tmp_path):
    """SmolLM2-1.7B's full fine-tune in fp32: weights, gradients and AdamW's moments alone take 16 bytes a
    parameter (about 26 GiB), recorded as out of memory before any process starts."""
    spec = {"architecture": SMOLLM2_1_7B, "dtype": "float32", "settings": {"ours_full": {"lora": {"r": 0}}}}
    r = memory_bench.run_config(spec, "ours_full", tmp_path, MemoryLimits(20_000, None), verbose=False)
    need = 16 * n_params(SMOLLM2_1_7B) / 2**20
    assert 1.6e9 < n_params(SMOLLM2_1_7B) < 1.8e9 and need > 20_000
    assert r == {
        "config": "ours_full",
        "out_of_memory": f"estimated: the weights, gradients and AdamW state alone take {need:.0f} MB, above "
        "the ceiling of 20000 MB (not started)",
    }
    assert not list(tmp_path.iterdir())  # no spec written, no child run
    assert 3.5e8 < n_params(SMOLLM2_360M) < 3.7e8


def test_a_child_past_its_memory_ceiling_is_stopped_and_recorded():
    # timeit's set-up fills 600 MB, then its statement waits: a child that grows past a 300 MB ceiling
    grow = ["timeit", "-n", "1", "-r", "1", "-s", "x = b'x' * (600 * 2**20)", "import time; time.sleep(30)"]
    run = run_child(grow, child_env(), verbose=False, limits=MemoryLimits(300, None))
    assert run.out_of_memory is not None and "passed the ceiling of 300 MB" in run.out_of_memory
    assert run.returncode != 0 and run.seconds < 25 and run.rss_seen_mb > 300
    fine = run_child(["platform"], child_env(), verbose=False, limits=MemoryLimits(300, None))
    assert fine.returncode == 0 and fine.out_of_memory is None and fine.output.strip()
    # a machine with less memory left than the child may leave it: stopped at once, whatever its own size
    crowded = run_child(grow, child_env(), verbose=False, limits=MemoryLimits(None, 10**9))
    assert crowded.out_of_memory is not None and "the machine's available memory fell to" in crowded.out_of_memory


def _figures(tokens_per_s: float, peak_mb: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "tokens_per_cpu_s": tokens_per_s / 2, "abs_peak_mb": peak_mb}


def test_the_goal_needs_the_speedup_at_no_more_memory_and_the_fit():
    oom = {"out_of_memory": "out of memory: ..."}
    results = {
        "ours_full": _figures(150, 900),
        "trl_full": _figures(100, 1000),  # 1.5x at less memory: met
        "ours_ckpt": _figures(140, 900),
        "trl_ckpt": _figures(100, 1000),  # 1.4x: not met
        "ours_lora": _figures(300, 1100),
        "trl_lora": _figures(100, 1000),  # more memory: not met
        "ours_lora_ckpt": _figures(10, 8 * 1024 + 1),
        "trl_lora_ckpt": oom,  # only ours fits: met, but not in 8 GiB
    }
    c = memory_bench.compare("smollm2-1.7b", results)
    assert c["full"] == {"tokens_per_s": 1.5, "tokens_per_cpu_s": 1.5, "abs_peak_mb": 0.9, "goal": "met"}
    assert c["ckpt"]["goal"] == "not met" and c["lora"]["goal"] == "not met"
    assert c["lora_ckpt"]["goal"] == "met" and c["lora_ckpt"]["fits"] == {"peak_mb": 8192, "met": False}
    flipped = memory_bench.compare("smollm2-360m", {"ours_full": oom, "trl_full": _figures(1, 1), "ours_ckpt": oom})
    assert flipped == {"full": {"goal": "not met", "why": "ours runs out of memory where TRL fits"}}
