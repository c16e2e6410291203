"""The checks a GPU machine needs, in one command (not a test), with their figures in one JSON file:

    python -m pipeline.bench.gpu_check --out reports/bench/gpu-check.json      # on the GPU machine
    python -m pipeline.bench.gpu_check --quick --out /tmp/gpu-check.json       # seconds, also on CPU

Each check runs on its own; one that fails or cannot run records why and the others go on.

1. ``peak``: the GPU's measured bf16 matrix-product rate (8192³, mean of 10 after 3 warm-ups), the
   denominator of the MFU.
2. ``bf16_reference``: the reference stage's log-probs (``pair_logprobs`` at ``train.bf16``) against the
   trainer's first-step log-probs of the same pairs, where the policy is the reference: the first-step
   check's ``ref_gap_per_token`` must be within ``train.ref_check_tol``. The gaps of an fp32 reference are
   recorded beside it: what a reference computed at another precision than training's looks like.
3. ``mfu``: :func:`train_preference` at params' precision and layout (``train.bf16``,
   ``train.shared_prompt``), timed steps after one warm-up: tokens/s (prompt + chosen + rejected) and
   MFU = 6 · N_params · tokens/s / peak (also with the non-embedding parameter count), and the peak GPU
   memory (:mod:`pipeline.bench.gpu_train`).
4. ``large_reference``: ``bf16_reference`` on SmolLM2-1.7B's architecture (random weights): the GPU's
   attention kernels at that size, with the reference batched as the reference stage batches it.
5. ``large_mfu``: ``mfu`` on SmolLM2-1.7B's architecture at ``--large-batch`` pairs, for a full fine-tune,
   with activation checkpointing, with a LoRA adapter of rank ``--lora-r`` and with both: tokens/s, MFU
   (goal: 40 % for the full fine-tune) and peak GPU memory each; one that runs out of memory records it.
6. ``profile``: where the time of ``large_mfu``'s full fine-tune step goes: two steps under
   ``torch.profiler`` after a warm-up, the share of their wall time the GPU was busy and the operators of
   most GPU time (:mod:`pipeline.bench.step_profile`).
7. ``nccl``: DDP and FSDP2 through ``torchrun`` with NCCL on every visible GPU (needs at least 2), the
   same steps as one process: the largest difference of the loss curves (:mod:`pipeline.bench.gpu_nccl`).
8. ``vllm``: the sampling benchmark (:mod:`pipeline.bench.sampling`: transformers vs vLLM, compiled,
   bf16) when vLLM is installed.
9. ``repro``: ``dvc repro`` of a fresh clone of this repository with ``profiles/gpu.yaml`` applied to its
   params.yaml, timed, when DVC is installed (``--repro``; it takes the longest).

Every training check runs the loss and train settings of a params.yaml variant (``--variant``) on
``policy.model`` (:mod:`pipeline.bench.gpu_policy`; ``model_source`` in the JSON says what was loaded); the
``large_*`` checks on SmolLM2-1.7B's architecture in ``policy.dtype`` under ``train.bf16``.

On a GPU machine without a package index but with PyTorch and transformers (a stock image), carry the
wheels of ``scripts/gpu_wheels.sh`` (polars, pydantic, peft: about 58 MB) and run, from the checkout:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:$PWD python3 -m pipeline.bench.gpu_check --out gpu-check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from pipeline.bench.gpu_nccl import dist_worker, nccl_check
from pipeline.bench.gpu_policy import PolicySpec, policy_spec
from pipeline.bench.gpu_train import StepSizes, large_train, reference_check, sync, timed_train
from pipeline.bench.process import PROJECT_ROOT, child_env
from pipeline.bench.step_profile import profile_step
from pipeline.settings.params import Params
from pipeline.settings.train import Variant

CHECKS = ("peak", "bf16_reference", "mfu", "large_reference", "large_mfu", "profile", "nccl", "vllm", "repro")


class Checks:
    """The checks of one run: params' variant, the policy to load, and the command line's sizes."""

    def __init__(self, args: argparse.Namespace, cfg: Params, variant: Variant, policy: PolicySpec):
        self.args, self.cfg, self.variant, self.policy = args, cfg, variant, policy
        self.results: dict = {}

    def peak(self) -> dict:
        if not torch.cuda.is_available():
            return {"skipped": "no GPU: MFU has no peak to divide by"}
        n = 4096 if self.args.quick else 8192
        left, right = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            left @ right
        sync()
        start = time.perf_counter()
        for _ in range(10):
            left @ right
        sync()
        seconds = (time.perf_counter() - start) / 10
        return {"n": n, "tflops": 2 * n**3 / seconds / 1e12, "gpu": torch.cuda.get_device_name(0)}

    def bf16_reference(self) -> dict:
        return reference_check(self.policy, self.variant)

    def step_sizes(self, batch: int) -> StepSizes:
        """The timed train steps' sizes at ``batch`` pairs per step (a quick run: small fixed ones)."""
        a = self.args
        if a.quick:
            return StepSizes(8, 3, 64, 16, 160)
        return StepSizes(batch, a.mfu_steps, a.mfu_prompt_len, a.mfu_response_len, a.mfu_max_length)

    def mfu(self) -> dict:
        sizes = self.step_sizes(self.args.mfu_batch)
        return timed_train(self.policy, self.variant, sizes, self.results.get("peak", {}).get("tflops"))

    def large_policy(self) -> PolicySpec:
        """SmolLM2-1.7B's architecture with random weights (a quick run: the tiny one), in policy.dtype."""
        if self.args.quick:
            return PolicySpec(self.cfg.policy.model, self.cfg.policy.dtype, "tiny", "a quick run")
        return PolicySpec(self.cfg.policy.model, self.cfg.policy.dtype, "smollm2-1.7b", "the larger policy's check")

    def large_reference(self) -> dict:
        return reference_check(self.large_policy(), self.variant)

    def large_mfu(self) -> dict:
        peak = self.results.get("peak", {}).get("tflops")
        sizes = self.step_sizes(self.args.large_batch)
        return large_train(self.large_policy(), self.variant, sizes, peak, lora_r=self.args.lora_r)

    def profile(self) -> dict:
        sizes = dataclasses.replace(self.step_sizes(self.args.large_batch), steps=2)
        return profile_step(self.large_policy(), self.variant, sizes)

    def nccl(self) -> dict:
        return nccl_check(self.variant, self.policy, quick=self.args.quick, loss_tol=self.args.loss_tol)

    def vllm(self) -> dict:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return {"skipped": "vLLM is not installed (pip install -e '.[vllm]')"}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sampling.json"
            cmd = [sys.executable, "-m", "pipeline.bench.sampling", "--params", self.args.params, "--out", str(out)]
            if torch.cuda.is_available():
                cmd += [
                    "--prompts",
                    "512",
                    "--n",
                    "8",
                    "--max-new-tokens",
                    "128",
                    "--batch-size",
                    "512",
                    "--dtype",
                    "bfloat16",
                    "--compiled",
                    "--max-num-seqs",
                    "1024",
                    "--logprob-check",
                    "256",
                ]
            else:
                cmd += (
                    ["--quick", "--backends", "transformers,vllm"]
                    if self.args.quick
                    else ["--prompts", "8", "--n", "2", "--max-new-tokens", "8"]
                )
            proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
            if proc.returncode:
                return {"failed": proc.stderr[-3000:]}
            return json.loads(out.read_text())["results"]

    def repro(self) -> dict:
        if shutil.which("dvc") is None:
            return {"skipped": "DVC is not installed (pip install -e .)"}
        import yaml

        from pipeline.model.loading import cache_root
        from pipeline.profiles import apply_profile, load_profile

        profile = load_profile(self.args.gpu_profile)
        work = Path(tempfile.mkdtemp(prefix="gpu-repro-"))
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(work)], check=True)
        params = apply_profile(yaml.safe_load((work / "params.yaml").read_text()), profile)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "DPO_PIPELINE_CACHE": str(cache_root())}  # the converted models, shared
        start = time.perf_counter()
        proc = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, check=False)
        result = {
            "workdir": str(work),
            "wall_s": time.perf_counter() - start,
            "rc": proc.returncode,
            "log_tail": proc.stdout[-2000:],
        }
        if proc.returncode == 0:
            result["metrics"] = {p.name: json.loads(p.read_text()) for p in (work / "metrics" / "eval").glob("*.json")}
        return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--variant", help="the train.variants entry whose loss and settings train (default: the first one)"
    )
    parser.add_argument(
        "--checks",
        default="peak,bf16_reference,mfu,large_reference,large_mfu,profile,nccl,vllm",
        help=f"comma-separated subset of {','.join(CHECKS)}",
    )
    parser.add_argument("--repro", action="store_true", help="also run the GPU profile's dvc repro")
    parser.add_argument("--gpu-profile", default="profiles/gpu.yaml", help="the profile --repro applies")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a tiny random model, small sizes (on a CPU, gloo stands in for NCCL)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="SmolLM2-135M's architecture with random weights instead of policy.model",
    )
    parser.add_argument("--mfu-batch", type=int, default=64, help="pairs per step")
    parser.add_argument("--mfu-steps", type=int, default=10)
    parser.add_argument("--mfu-prompt-len", type=int, default=256)
    parser.add_argument("--mfu-response-len", type=int, default=192)
    parser.add_argument("--mfu-max-length", type=int, default=1024)
    parser.add_argument("--large-batch", type=int, default=8, help="large_mfu: pairs per step of SmolLM2-1.7B")
    parser.add_argument("--lora-r", type=int, default=16, help="large_mfu: the adapter's rank in the LoRA settings")
    parser.add_argument("--loss-tol", type=float, default=2e-2, help="NCCL check: bf16 losses vs one process")
    parser.add_argument("--out", help="write the figures as JSON here (reports/bench/ keeps recorded runs)")
    parser.add_argument("--dist-worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dist_worker:
        dist_worker(*args.dist_worker)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    checks = [c for c in args.checks.split(",") if c] + (["repro"] if args.repro else [])
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {CHECKS}")
    cfg = Params.load(args.params)
    variant = cfg.variant(args.variant or next(iter(cfg.train.variants)))
    runner = Checks(args, cfg, variant, policy_spec(cfg, quick=args.quick, random_weights=args.random_weights))
    results = runner.results
    results.update(
        {
            "bench": "gpu_check",
            "host": platform.node(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "variant": variant.name,
            "policy_dtype": cfg.policy.dtype,  # the weights' dtype; train.bf16 autocasts the compute
            "quick": args.quick,
            "args": {k: v for k, v in vars(args).items() if k != "dist_worker"},
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    )
    for name in checks:
        start = time.perf_counter()
        try:
            results[name] = getattr(runner, name)()
        except Exception:  # noqa: BLE001 - record it; the other checks still run
            results[name] = {"failed": traceback.format_exc()[-3000:]}
        results[name]["check_s"] = time.perf_counter() - start
        print(f"{name}: {json.dumps(results[name], default=str)[:1500]}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    failed = [n for n in checks if "failed" in results[n] or results[n].get("passed") is False]
    print("failed checks: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
