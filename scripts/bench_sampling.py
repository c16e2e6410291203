#!/usr/bin/env python
"""Benchmark the sampling backends on the same prompts in one run (not a test).

Both backends go through the pipeline's own samplers (``TransformersSampler``, ``VLLMSampler``)
exactly as the sample stage calls them: the same model folder, dtype, prompts (reasoning-gym
problems with the pipeline's instruction, chat template applied), ``n`` candidates per prompt,
temperature, top-p and ``max_new_tokens``. Each backend runs in a fresh subprocess.

tokens/s = generated tokens (every candidate's tokens, EOS included) / wall time of the
``generate`` calls, after one untimed warm-up call on the first few prompts. Engine start-up
(model load, KV-cache allocation, compilation) is printed separately, together with the
end-to-end figure (start-up + warm-up + timed calls) that decides which backend makes a short
pipeline run faster. On CPU the vLLM child gets the LD_PRELOAD (tcmalloc, Intel OpenMP) that the sample
stage re-executes itself with (``--no-preload``: without).

    python scripts/bench_sampling.py --prompts 64 --n 8 --max-new-tokens 32 --out bench_sampling.json

On a machine without reasoning-gym (a bare GPU box), write the prompts here and pass the file there:

    python scripts/bench_sampling.py --prompts 1024 --write-prompts prompts.json
    python scripts/bench_sampling.py --prompts-file prompts.json --prompts 1024 ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prompts(args) -> list[str]:
    """Warm-up prompts then timed prompts: reasoning-gym problems with the pipeline's instruction."""
    if args.prompts_file:
        prompts = json.loads(Path(args.prompts_file).read_text())
        need = args.prompts + args.warmup_prompts
        if len(prompts) < need:
            raise SystemExit(f"{args.prompts_file}: {len(prompts)} prompts, need {need}")
        return prompts[:need]
    from pipeline.data.prompts import generate_reasoning_gym, make_prompt

    rows = generate_reasoning_gym("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
                                  seed=1234, n=args.prompts + args.warmup_prompts)
    return [make_prompt(r["question"], " Give the final answer as 'Answer: <number>'.") for r in rows]


def _vllm_kwargs(args) -> dict:
    """The engine settings of params.yaml's ``vllm`` section, with this run's command-line overrides."""
    import yaml

    kwargs = dict(yaml.safe_load((ROOT / "params.yaml").read_text())["vllm"], max_model_len=512)
    if args.compiled:
        kwargs["enforce_eager"] = False
    for key in ("max_num_seqs", "gpu_memory_utilization"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    return kwargs


def _child(args) -> dict:
    from pipeline.config import VLLMParams
    from pipeline.model import loading
    from pipeline.generation.registry import get_sampler
    from pipeline.generation.types import GenerationSettings
    from pipeline.generation.vllm_backend.environment import preloaded_libs

    torch_threads = None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        torch_threads = torch.get_num_threads()
    model = str(loading.resolve(args.model))
    prompts = _prompts(args)
    warm, timed = prompts[:args.warmup_prompts], prompts[args.warmup_prompts:]
    settings = GenerationSettings(n=args.n, temperature=args.temperature, top_p=1.0,
                                  max_new_tokens=args.max_new_tokens, seed=0)
    t0 = time.perf_counter()
    vllm = None if args.backend == "transformers" else VLLMParams(**_vllm_kwargs(args))
    kwargs = {"batch_size": args.batch_size} if vllm is None else {"vllm": vllm}
    sampler = get_sampler(args.backend, model, dtype=args.dtype, **kwargs)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    sampler.generate(warm, settings, progress=None)
    warmup = time.perf_counter() - t1
    t2, c2 = time.perf_counter(), time.process_time()
    outs = sampler.generate(timed, settings, progress=None)
    wall, cpu = time.perf_counter() - t2, time.process_time() - c2
    tokens = sum(len(c.token_ids) for cands in outs for c in cands)
    stopped = sum(c.finish_reason == "stop" for cands in outs for c in cands)
    if hasattr(sampler, "close"):
        sampler.close()
    check = None
    if args.logprob_check and args.backend != "transformers":
        from pipeline.generation.logprob_check import logprob_check

        pairs = [(p, c) for p, cands in zip(timed, outs) for c in cands][:args.logprob_check]
        check = logprob_check(model, args.dtype, [p for p, _ in pairs], [c for _, c in pairs],
                              batch_size=args.batch_size)
    return {"logprob_check": check, "backend": args.backend, "startup_s": startup, "warmup_s": warmup, "wall_s": wall,
            "cpu_s_main_process": cpu, "tokens": tokens, "sequences": sum(len(c) for c in outs),
            "stopped": stopped, "tok_per_s": tokens / wall, "end_to_end_s": startup + warmup + wall,
            "torch_threads": torch_threads, "ld_preload": preloaded_libs(),
            "block_size": None if vllm is None else vllm.block_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="builtin name or model folder")
    ap.add_argument("--backends", default="transformers,vllm")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", type=int, default=32, help="transformers: sequences per generate call")
    ap.add_argument("--max-num-seqs", type=int, help="vLLM: sequences per engine step (default: params.yaml)")
    ap.add_argument("--compiled", action="store_true", help="vLLM: torch.compile instead of enforce_eager")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the transformers child (0: default)")
    ap.add_argument("--prompts-file", help="JSON list of prompt strings (from --write-prompts) instead of reasoning-gym")
    ap.add_argument("--write-prompts", help="write the prompts as JSON here and exit")
    ap.add_argument("--gpu-memory-utilization", type=float, help="vLLM on a GPU (default: params.yaml)")
    ap.add_argument("--logprob-check", type=int, default=0,
                    help="re-score this many vLLM candidates with the training code path (generation.logprob_check)")
    ap.add_argument("--no-preload", action="store_true",
                    help="vLLM on CPU: without the tcmalloc / Intel OpenMP LD_PRELOAD the sample stage uses")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--backend", help=argparse.SUPPRESS)  # internal: run one backend in this process
    args = ap.parse_args()

    if args.write_prompts:
        Path(args.write_prompts).write_text(json.dumps(_prompts(args)))
        return
    if args.backend:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--backend", backend, *sys.argv[1:]]
        env = {**os.environ}
        if backend == "vllm" and not args.no_preload:  # as the sample stage runs it (its LD_PRELOAD re-execution)
            sys.path.insert(0, str(ROOT))
            from pipeline.generation.vllm_backend.environment import cpu_preload_env

            env = cpu_preload_env(env) or env
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{backend}: failed (exit {proc.returncode})")
        results[backend] = json.loads(line[len("RESULT "):])
        print(f"{backend}: {json.dumps(results[backend])}", flush=True)  # kept if a later backend fails

    print(f"model {args.model}, {args.dtype}, {args.prompts} prompts x n={args.n}, T={args.temperature}, "
          f"max_new_tokens={args.max_new_tokens}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'backend':<13}{'startup s':>10}{'gen s':>9}{'tokens':>8}{'tok/s':>9}{'end-to-end s':>14}")
    for r in results.values():
        print(f"{r['backend']:<13}{r['startup_s']:>10.1f}{r['wall_s']:>9.1f}{r['tokens']:>8d}"
              f"{r['tok_per_s']:>9.1f}{r['end_to_end_s']:>14.1f}")
    if {"transformers", "vllm"} <= results.keys():
        t, v = results["transformers"], results["vllm"]
        ratio = v["tok_per_s"] / t["tok_per_s"]
        print(f"vllm / transformers: {ratio:.2f}x tokens/s; end-to-end {t['end_to_end_s'] / v['end_to_end_s']:.2f}x")
        results["ratio_tok_per_s"] = ratio
    for r in results.values():
        if isinstance(r, dict) and r.get("logprob_check"):
            c = r["logprob_check"]
            print(f"{r['backend']} log-prob vs training path ({c['dtype']}, {c['n']} candidates): mean |diff| "
                  f"{c['mean_abs_diff']:.2e} nats/seq, max {c['max_abs_diff']:.2e}, "
                  f"{c['mean_abs_diff_per_token']:.2e} per token")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
