"""profiles/gpu.yaml applied by pipeline.profiles, and pipeline.bench.gpu_check's checks on a CPU (on a GPU the
same command runs them at full size)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from repo_utils import repo_params, run_module

from pipeline.profiles import apply_profile, load_profile, profile_args
from pipeline.settings.params import Params

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile(ROOT / "profiles/gpu.yaml")


def test_the_gpu_profile_changes_existing_keys_into_valid_params():
    params = apply_profile(repo_params(), PROFILE)
    cfg = Params.parse(params, "params.yaml + profiles/gpu.yaml")
    assert cfg.policy.eval.backend == cfg.evaluate.generation.backend == "vllm"
    assert cfg.vllm.block_size is None and cfg.vllm.max_num_seqs == 1024 and cfg.prepare.n_test == 512
    assert cfg.train.runtime.nproc == PROFILE["train.runtime.nproc"]

    def flat(d, p=""):
        return {
            k2: v2
            for k, v in d.items()
            for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])
        }

    # nothing else moved
    before, after = flat(repo_params()), flat(params)
    assert {k for k in after if after[k] != before.get(k)} <= set(PROFILE)


def test_a_profile_key_missing_from_params_is_refused():
    with pytest.raises(KeyError, match="vllm.max_num_seq"):
        apply_profile(repo_params(), {"vllm.max_num_seq": 8})


def test_profile_args_are_what_dvc_exp_run_takes():
    args = profile_args(
        {"vllm.block_size": None, "train.variants.dpo.beta": 0.3, "a.b": [1, 2], "evaluate.generation.backend": "vllm"}
    )
    assert shlex.split(" ".join(args)) == [
        "-S",
        "vllm.block_size=null",
        "-S",
        "train.variants.dpo.beta=0.3",
        "-S",
        "a.b=[1, 2]",
        "-S",
        "evaluate.generation.backend=vllm",
    ]


def test_the_command_prints_the_profile_as_dvc_exp_run_arguments():
    proc = run_module("pipeline.profiles", ["profiles/gpu.yaml"], ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[0::2] == ["-S"] * len(PROFILE)
    assert [w.split("=", 1)[0] for w in words[1::2]] == list(PROFILE)
    assert "vllm.block_size=null" in words and "policy.eval.backend=vllm" in words


@pytest.mark.slow
def test_gpu_check_quick_runs_its_checks_on_cpu(tmp_path):
    """The checks' code paths end to end at small sizes on CPU, on a tiny random model (gloo standing in for
    NCCL, 2 processes): the reference taken as the reference stage takes it passes the trainer's first-step
    check, and DDP and FSDP2 follow the one-process loss curve."""
    import json

    import torch

    out = tmp_path / "gpu.json"
    proc = run_module(
        "pipeline.bench.gpu_check",
        ["--quick", "--checks", "peak,bf16_reference,nccl", "--out", str(out)],
        ROOT,
        timeout=900,
    )
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
