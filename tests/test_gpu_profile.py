"""profiles/gpu.yaml and scripts/gpu_check.py's pieces that need no GPU (the checks themselves are run on a GPU)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from repo_utils import repo_params

from pipeline.config import parse_params

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
PROFILE = yaml.safe_load((ROOT / "profiles/gpu.yaml").read_text())


def test_the_gpu_profile_changes_existing_keys_into_valid_params():
    params = gpu_check.apply_profile(repo_params(), PROFILE)
    cfg = parse_params(params, "params.yaml + profiles/gpu.yaml")
    assert cfg.policy.eval.backend == cfg.evaluate.generation.backend == "vllm"
    assert cfg.vllm.block_size is None and cfg.vllm.max_num_seqs == 1024 and cfg.prepare.n_test == 512
    assert cfg.train.runtime.nproc == PROFILE["train.runtime.nproc"]
    # nothing else moved
    flat = lambda d, p="": {k2: v2 for k, v in d.items()  # noqa: E731
                            for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
    before, after = flat(repo_params()), flat(params)
    assert {k for k in after if after[k] != before.get(k)} <= set(PROFILE)


def test_a_profile_key_missing_from_params_is_refused():
    with pytest.raises(KeyError, match="vllm.max_num_seq"):
        gpu_check.apply_profile(repo_params(), {"vllm.max_num_seq": 8})


def test_profile_args_are_what_dvc_exp_run_takes():
    args = gpu_check.profile_args({"vllm.block_size": None, "train.variants.dpo.beta": 0.3, "a.b": [1, 2],
                                   "evaluate.generation.backend": "vllm"})
    assert shlex.split(" ".join(args)) == ["-S", "vllm.block_size=null", "-S", "train.variants.dpo.beta=0.3",
                                           "-S", "a.b=[1, 2]", "-S", "evaluate.generation.backend=vllm"]


@pytest.mark.slow
def test_gpu_check_quick_runs_its_checks_on_cpu(tmp_path):
    """The script's code paths end to end at small sizes on CPU (gloo standing in for NCCL, 2 processes): the
    reference taken as the reference stage takes it passes the trainer's first-step check, and DDP and FSDP2
    follow the one-process loss curve. On a GPU the same command runs at full size."""
    import json
    import os
    import subprocess

    import torch

    out = tmp_path / "gpu.json"
    env = {**os.environ, "GPU_CHECK_RANDOM_WEIGHTS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--quick", "--checks",
                           "peak,bf16_reference,nccl", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    if torch.cuda.is_available():  # a timed rate: below any GPU's bf16 peak (an unsynchronised timer is far above)
        assert 0 < r["peak"]["tflops"] < 10_000 and r["peak"]["gpu"] == r["gpus"][0]
    else:  # no GPU, no peak: the MFU has no made-up denominator
        assert r["gpus"] == [] and "tflops" not in r["peak"] and r["peak"]["skipped"].startswith("no GPU")
    assert r["bf16_reference"]["passed"] and r["bf16_reference"]["same_precision"]["ref_gap_max"] <= 1e-4
    n = r["nccl"]
    assert n["world"] == 2 and n["passed"] and len(n["ddp_losses"]) == len(n["single"]) == 6
    assert max(n["max_abs_loss_diff"].values()) < 1e-4 and n["single"][-1] < n["single"][0]
