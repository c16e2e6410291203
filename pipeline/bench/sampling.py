"""Benchmark the sampling backends on the same prompts in one run (not a test).

Both backends go through the pipeline's own samplers (:func:`pipeline.generation.registry.sampler_for`)
exactly as the sample stage calls them: the same model folder (``models/policy`` when the pipeline has
run here, else ``policy.model``), ``policy.dtype``, prompts (params' reasoning-gym problems with
``prepare.instruction``, chat template applied), ``sample``'s ``n``, temperature, top-p, seed,
``max_new_tokens`` and ``batch_size``, and the engine settings of params' ``vllm`` section; the command
line may override some. Each backend runs in a fresh process.

tokens/s = generated tokens (every candidate's tokens, EOS included) / wall time of the ``generate``
calls, after one untimed warm-up call on the first few prompts. Engine start-up (model load, KV-cache
allocation, compilation) is printed separately, together with the end-to-end figure (start-up +
warm-up + timed calls) that decides which backend makes a short pipeline run faster. On a CPU the vLLM
child gets the LD_PRELOAD (tcmalloc, Intel OpenMP) that the sample stage re-executes itself with
(``--no-preload``: without).

    python -m pipeline.bench.sampling --prompts 64 --n 8 --out reports/bench/cpu-2core-fp32-64x8.json
    python -m pipeline.bench.sampling --quick --out /tmp/bench-sampling.json      # seconds, on CPU

On a machine without reasoning-gym (a bare GPU box), write the prompts here and pass the file there:

    python -m pipeline.bench.sampling --prompts 1024 --write-prompts prompts.json
    python -m pipeline.bench.sampling --prompts-file prompts.json --prompts 1024 ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench.models import bench_model
from pipeline.bench.process import child_env
from pipeline.settings.params import Params


@dataclass(frozen=True)
class Sizes:
    backends: str
    prompts: int  # timed prompts
    warmup_prompts: int
    n: int | None  # candidates per prompt; None: sample.n
    max_new_tokens: int | None  # None: sample.max_new_tokens


FULL = Sizes(backends="transformers,vllm", prompts=64, warmup_prompts=4, n=None, max_new_tokens=None)
QUICK = Sizes(backends="transformers", prompts=4, warmup_prompts=1, n=2, max_new_tokens=4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--model", help="builtin name or model folder (default: models/policy, else policy.model)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK.prompts} prompts x n={QUICK.n}, "
        f"{QUICK.max_new_tokens} new tokens, {QUICK.backends} only, a tiny random model where "
        "there is no models/policy",
    )
    parser.add_argument("--backends", help=f"comma-separated (default {FULL.backends})")
    parser.add_argument("--prompts", type=int, help=f"timed prompts (default {FULL.prompts})")
    parser.add_argument(
        "--warmup-prompts", type=int, help=f"prompts of the untimed call (default {FULL.warmup_prompts})"
    )
    parser.add_argument("--n", type=int, help="candidates per prompt (default: sample.n)")
    parser.add_argument("--temperature", type=float, help="default: sample.temperature")
    parser.add_argument("--max-new-tokens", type=int, help="default: sample.max_new_tokens")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: policy.dtype")
    parser.add_argument(
        "--batch-size", type=int, help="transformers: sequences per generate call (default: sample.batch_size)"
    )
    parser.add_argument("--max-num-seqs", type=int, help="vLLM: sequences per engine step (default: vllm.max_num_seqs)")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, help="vLLM on a GPU (default: vllm.gpu_memory_utilization)"
    )
    parser.add_argument("--compiled", action="store_true", help="vLLM: torch.compile instead of enforce_eager")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    parser.add_argument(
        "--prompts-file", help="JSON list of prompt strings (from --write-prompts) instead of reasoning-gym"
    )
    parser.add_argument("--write-prompts", help="write the prompts as JSON here and exit")
    parser.add_argument(
        "--logprob-check",
        type=int,
        default=0,
        help="re-score this many vLLM candidates with the training code path (generation.logprob_check)",
    )
    parser.add_argument(
        "--no-preload",
        action="store_true",
        help="vLLM on CPU: without the tcmalloc / Intel OpenMP LD_PRELOAD the sample stage uses",
    )
    parser.add_argument("--out", help="write the figures as JSON here (reports/bench/ keeps recorded runs)")
    parser.add_argument("--child", nargs=3, metavar=("SPEC", "BACKEND", "RESULT"), help=argparse.SUPPRESS)
    return parser


def resolve_args(args: argparse.Namespace, cfg: Params) -> argparse.Namespace:
    """The command line with every unset value taken from the run's sizes and params.yaml."""
    sizes = QUICK if args.quick else FULL
    args.backends = args.backends or sizes.backends
    args.prompts = args.prompts or sizes.prompts
    args.warmup_prompts = args.warmup_prompts or sizes.warmup_prompts
    args.n = args.n or sizes.n or cfg.sample.n
    args.max_new_tokens = args.max_new_tokens or sizes.max_new_tokens or cfg.sample.max_new_tokens
    args.temperature = cfg.sample.temperature if args.temperature is None else args.temperature
    args.dtype = args.dtype or cfg.policy.dtype
    args.batch_size = args.batch_size or cfg.sample.batch_size
    return args


def prompts_for(args: argparse.Namespace, cfg: Params) -> list[str]:
    """Warm-up prompts then timed prompts: params' reasoning-gym problems with its instruction."""
    need = args.prompts + args.warmup_prompts
    if args.prompts_file:
        prompts = json.loads(Path(args.prompts_file).read_text())
        if len(prompts) < need:
            raise SystemExit(f"{args.prompts_file}: {len(prompts)} prompts, need {need}")
        return prompts[:need]
    from pipeline.data.prompt_text import make_prompt
    from pipeline.data.reasoning_gym_prompts import generate_reasoning_gym

    source = cfg.prepare.reasoning_gym
    rows = generate_reasoning_gym(source.task, source.config, source.seed, need)
    return [make_prompt(row["question"], cfg.prepare.instruction) for row in rows]


def build_spec(args: argparse.Namespace, cfg: Params, model: str, prompts: list[str]) -> dict:
    """What every backend's child runs: the model, prompts, decoding and engine settings."""
    engine = {
        "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": False if args.compiled else None,
    }
    vllm = cfg.vllm.model_copy(update={k: v for k, v in engine.items() if v is not None})
    generation = {
        "n": args.n,
        "temperature": args.temperature,
        "top_p": cfg.sample.top_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": cfg.sample.seed,
    }
    return {
        "model": model,
        "dtype": args.dtype,
        "prompts": prompts,
        "warmup_prompts": args.warmup_prompts,
        "generation": generation,
        "batch_size": args.batch_size,
        "vllm": vllm.model_dump(),
        "threads": args.threads,
        "logprob_check": args.logprob_check,
    }


def run_backend(spec: dict, backend: str) -> dict:
    """One backend's figures, in this process: start-up, an untimed warm-up call, the timed call."""
    from pipeline.generation.registry import sampler_for
    from pipeline.generation.types import GenerationSettings
    from pipeline.preload import preloaded_libs
    from pipeline.settings.sampling import VLLMParams

    torch_threads = None
    if spec["threads"]:
        import torch

        torch.set_num_threads(spec["threads"])
        torch_threads = torch.get_num_threads()
    warm, timed = spec["prompts"][: spec["warmup_prompts"]], spec["prompts"][spec["warmup_prompts"] :]
    settings = GenerationSettings(**spec["generation"])
    vllm = VLLMParams(**spec["vllm"])
    start = time.perf_counter()
    sampler = sampler_for(backend, spec["model"], dtype=spec["dtype"], batch_size=spec["batch_size"], vllm=vllm)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    sampler.generate(warm, settings, progress=None)
    warmup = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = sampler.generate(timed, settings, progress=None)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if hasattr(sampler, "close"):
        sampler.close()
    tokens = sum(len(c.token_ids) for cands in outs for c in cands)
    check = None
    if spec["logprob_check"] and backend != "transformers":
        from pipeline.generation.logprob_check import logprob_check

        pairs = [(p, c) for p, cands in zip(timed, outs) for c in cands][: spec["logprob_check"]]
        check = logprob_check(
            spec["model"], spec["dtype"], [p for p, _ in pairs], [c for _, c in pairs], batch_size=spec["batch_size"]
        )
    return {
        "logprob_check": check,
        "backend": backend,
        "startup_s": startup,
        "warmup_s": warmup,
        "wall_s": wall,
        "cpu_s_main_process": cpu,
        "tokens": tokens,
        "sequences": sum(len(c) for c in outs),
        "stopped": sum(c.finish_reason == "stop" for cands in outs for c in cands),
        "tok_per_s": tokens / wall,
        "end_to_end_s": startup + warmup + wall,
        "torch_threads": torch_threads,
        "ld_preload": preloaded_libs(),
        "block_size": vllm.block_size if backend == "vllm" else None,
    }


def run_children(spec: dict, backends: list[str], workdir: Path, preload: bool) -> dict:
    """Each backend in a fresh process (vLLM's with the sample stage's LD_PRELOAD on a CPU)."""
    from pipeline.generation.vllm_backend.environment import cpu_preload_env

    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    results = {}
    for backend in backends:
        result_path = workdir / f"{backend}.json"
        env = child_env()
        if backend == "vllm" and preload:
            env = cpu_preload_env(env) or env
        cmd = [sys.executable, "-m", "pipeline.bench.sampling", "--child", str(spec_path), backend, str(result_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode or not result_path.is_file():
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{backend}: failed (exit {proc.returncode})")
        results[backend] = json.loads(result_path.read_text())
        print(f"{backend}: {json.dumps(results[backend])}", flush=True)  # kept if a later backend fails
    return results


def report(args: argparse.Namespace, results: dict) -> None:
    """The table, the vLLM / transformers ratios (also into ``results``) and the log-prob checks."""
    print(
        f"model {args.model}, {args.dtype}, {args.prompts} prompts x n={args.n}, T={args.temperature}, "
        f"max_new_tokens={args.max_new_tokens}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'backend':<13}{'startup s':>10}{'gen s':>9}{'tokens':>8}{'tok/s':>9}{'end-to-end s':>14}")
    for r in results.values():
        print(
            f"{r['backend']:<13}{r['startup_s']:>10.1f}{r['wall_s']:>9.1f}{r['tokens']:>8d}"
            f"{r['tok_per_s']:>9.1f}{r['end_to_end_s']:>14.1f}"
        )
    if {"transformers", "vllm"} <= results.keys():
        transformers, vllm = results["transformers"], results["vllm"]
        ratio = vllm["tok_per_s"] / transformers["tok_per_s"]
        print(
            f"vllm / transformers: {ratio:.2f}x tokens/s; end-to-end "
            f"{transformers['end_to_end_s'] / vllm['end_to_end_s']:.2f}x"
        )
        results["ratio_tok_per_s"] = ratio
    for r in results.values():
        if isinstance(r, dict) and r.get("logprob_check"):
            check = r["logprob_check"]
            print(
                f"{r['backend']} log-prob vs training path ({check['dtype']}, {check['n']} candidates): mean "
                f"|diff| {check['mean_abs_diff']:.2e} nats/seq, max {check['max_abs_diff']:.2e}, "
                f"{check['mean_abs_diff_per_token']:.2e} per token"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        spec_path, backend, result_path = args.child
        result = run_backend(json.loads(Path(spec_path).read_text()), backend)
        Path(result_path).write_text(json.dumps(result))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = Params.load(args.params)
    args = resolve_args(args, cfg)
    prompts = prompts_for(args, cfg)
    if args.write_prompts:
        Path(args.write_prompts).write_text(json.dumps(prompts))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        args.model = bench_model(cfg, args.model, quick=args.quick, workdir=Path(tmp))
        spec = build_spec(args, cfg, args.model, prompts)
        results = run_children(spec, args.backends.split(","), Path(tmp), preload=not args.no_preload)
    report(args, results)
    if args.out:
        payload = {
            "bench": "sampling",
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "generation": spec["generation"],
            "vllm": spec["vllm"],
            "results": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
