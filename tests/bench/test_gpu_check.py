"""`python -m pipeline.bench.gpu_check --quick` on a CPU: the checks that need no second process, on a tiny
random model with params.yaml's variant (the distributed check runs in tests/test_gpu_profile.py's slow test);
the larger policy's checks run on the same tiny stand-in."""

from __future__ import annotations

import json

from repo_utils import run_module, write_params

from pipeline.settings.params import Params


def test_quick_checks_record_the_reference_check_and_the_throughput(tmp_path):
    write_params(tmp_path / "params.yaml")
    proc = run_module(
        "pipeline.bench.gpu_check",
        [
            "--quick",
            "--threads",
            "1",
            "--checks",
            "peak,bf16_reference,mfu,large_reference,large_mfu,profile",
            "--out",
            "gpu.json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "failed checks: none"
    out = json.loads((tmp_path / "gpu.json").read_text())
    cfg = Params.load(tmp_path / "params.yaml")
    assert out["bench"] == "gpu_check" and out["quick"] is True and out["variant"] == next(iter(cfg.train.variants))
    assert "skipped" in out["peak"] or out["peak"]["tflops"] > 0
    reference = out["bf16_reference"]
    assert reference["passed"] is True and reference["ref_check_tol"] == cfg.train.ref_check_tol
    assert reference["bf16"] == cfg.train.bf16 and "tiny, random weights" in reference["model_source"]
    same = reference["same_precision"]
    assert 0 <= same["ref_gap_per_token"] <= same["ref_gap_mean"] <= same["ref_gap_max"] <= 1e-4
    assert reference["fp32_reference"]["failed"] is None or "first step" in reference["fp32_reference"]["failed"]
    mfu = out["mfu"]
    assert mfu["timed_steps"] == 3 and mfu["batch_pairs"] == 8 and mfu["tokens"] > 0
    assert mfu["tokens_per_s"] > 0 and mfu["seconds"] > 0
    assert mfu["n_params"] > mfu["n_params_non_embedding"] > 0 and mfu["bf16"] == cfg.train.bf16
    assert "peak_gpu_mb" not in mfu and "mfu" not in mfu  # no GPU: no GPU memory, no peak to divide by
    # the larger policy's checks, on the quick run's tiny stand-in: the reference check and each setting
    assert out["large_reference"]["passed"] is True
    large = out["large_mfu"]
    assert set(large) == {"full", "ckpt", "lora", "lora_ckpt", "check_s"}
    for name in ("full", "ckpt", "lora", "lora_ckpt"):
        assert large[name]["tokens"] == mfu["tokens"] and large[name]["tokens_per_s"] > 0
        assert large[name]["gradient_checkpointing"] == name.endswith("ckpt")
    assert large["full"]["trainable_params"] == large["ckpt"]["trainable_params"] == large["full"]["n_params"]
    assert 0 < large["lora"]["trainable_params"] == large["lora_ckpt"]["trainable_params"] < mfu["n_params"] // 10
    # where the full step's time goes: on a CPU, the operators by self CPU time, matrix products among them
    prof = out["profile"]
    assert prof["profiled_steps"] == 2 and prof["batch_pairs"] == 8 and 0 < prof["busy_s"]
    assert 0 < prof["wall_s"] and "top_kernels" not in prof and prof["ops_by"] == "self CPU time"
    shares = [op["share"] for op in prof["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert "aten::mm" in {op["name"] for op in prof["top_ops"]}
    assert out["args"]["checks"].endswith(",profile") and out["policy_dtype"] == cfg.policy.dtype
