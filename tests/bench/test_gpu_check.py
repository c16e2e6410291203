"""`python -m pipeline.bench.gpu_check --quick` on a CPU: the checks that need no second process, on a tiny
random model with params.yaml's variant (the distributed check runs in tests/test_gpu_profile.py's slow test)."""

from __future__ import annotations

import json

from repo_utils import run_module, write_params

from pipeline.settings.params import Params


def test_quick_checks_record_the_reference_check_and_the_throughput(tmp_path):
    write_params(tmp_path / "params.yaml")
    proc = run_module(
        "pipeline.bench.gpu_check",
        ["--quick", "--threads", "1", "--checks", "peak,bf16_reference,mfu", "--out", "gpu.json"],
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
    assert 0 <= reference["same_precision"]["ref_gap_mean"] <= reference["same_precision"]["ref_gap_max"] <= 1e-4
    assert reference["fp32_reference"]["failed"] is None or "first step" in reference["fp32_reference"]["failed"]
    mfu = out["mfu"]
    assert mfu["timed_steps"] == 3 and mfu["batch_pairs"] == 8 and mfu["tokens"] > 0
    assert mfu["tokens_per_s"] > 0 and mfu["seconds"] > 0
    assert mfu["n_params"] > mfu["n_params_non_embedding"] > 0 and mfu["bf16"] == cfg.train.bf16
