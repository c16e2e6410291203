#!/usr/bin/env python
"""Benchmark our preference trainer against TRL's ``DPOTrainer`` (not a test).

Three configurations train the same model on the same pairs, in the same per-step batches, for the
same number of steps, each in a fresh subprocess so that memory is measured per configuration:

- ``ours``: :func:`pipeline.training.trainer.train_preference` (reference log-probs precomputed, LM head on
  response positions only, each pair's prompt run once: ``train.shared_prompt``);
- ``ours_padded``: the same with ``shared_prompt`` off (each response after its own prompt copy; not run
  unless named in ``--configs``);
- ``trl_default``: ``DPOTrainer`` with its defaults (a reference model forward every step);
- ``trl_precompute``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (its precompute pass runs
  in the trainer's constructor: timed separately, not part of the training-loop time).

Common settings: fp32, no gradient checkpointing, DPO sigmoid loss with beta 0.1, constant lr,
no eval, no logging, no saving. One warm-up step runs first and is not timed.

tokens/s = (prompt + chosen + rejected tokens of the timed steps' pairs, counted from the data) /
training-loop wall time. Memory: ``train peak`` is the peak RSS of the training loop minus the RSS
right after the policy was loaded (a TRL reference model loaded later counts as training memory);
``abs peak`` is the whole child process's peak RSS. ``CPU s`` / ``tok/CPU-s`` use the process CPU time
instead of wall time: a cross-check when other processes share the CPU (then also try ``--threads 1``:
with every core busy, OpenMP threads waiting for a descheduled sibling distort wall times badly).
Needs the ``bench`` extra (``pip install -e '.[bench]'``).

    python scripts/bench_trainer.py --steps 12 --batch-size 8 --max-length 160 --out bench_trainer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ("ours", "ours_padded", "trl_default", "trl_precompute")
DEFAULT_CONFIGS = ("ours", "trl_default", "trl_precompute")
INSTRUCTION = " Give the final answer as 'Answer: <number>'."


# ----------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # best effort
    return kb / 1024


def hwm_mb() -> float:
    """Peak RSS since the last :func:`reset_hwm` (or since start)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- data
def _synth_pairs(tok, n: int, seed: int) -> list[dict]:
    """Arithmetic prompts (reasoning-gym chain_sum style) with a correct and a wrong worked answer."""
    from pipeline.model.logprobs import encode_prompt, encode_response

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op = rng.choice("+-")
        c = a + b if op == "+" else a - b
        wrong = c + rng.choice([-10, -2, -1, 1, 2, 10])
        q = f"State the final answer to the following arithmetic problem: {a} {op} {b} =" + INSTRUCTION
        chosen = f"{a} {op} {b} = {c}\nAnswer: {c}"
        rejected = f"{a} {op} {b} = {wrong}\nAnswer: {wrong}"
        out.append({"pair_id": f"synth-{i}", "prompt_ids": encode_prompt(tok, q),
                    "chosen_ids": encode_response(tok, chosen), "rejected_ids": encode_response(tok, rejected),
                    "ref_w": None, "ref_l": None})
    return out


def load_pairs(spec: str, reference: str | None, tok, n_synth: int, seed: int) -> tuple[list[dict], str]:
    import polars as pl

    if spec == "synth":
        return _synth_pairs(tok, n_synth, seed), f"synthesized ({n_synth} arithmetic pairs)"
    df = pl.read_parquet(spec)
    pairs = [{"pair_id": r["pair_id"], "prompt_ids": list(r["prompt_ids"]), "chosen_ids": list(r["chosen_ids"]),
              "rejected_ids": list(r["rejected_ids"]), "ref_w": None, "ref_l": None}
             for r in df.select("pair_id", "prompt_ids", "chosen_ids", "rejected_ids").iter_rows(named=True)]
    source = f"{spec} ({len(pairs)} pairs)"
    if reference and Path(reference).is_file():
        ref = {r["pair_id"]: (r["ref_w"], r["ref_l"]) for r in pl.read_parquet(reference).iter_rows(named=True)}
        for p in pairs:
            if p["pair_id"] in ref:
                p["ref_w"], p["ref_l"] = ref[p["pair_id"]]
        source += f", reference log-probs from {reference}"
    return pairs, source


def fill_reference(pairs: list[dict], model_path: str, pad_id: int, max_length: int) -> int:
    """Reference log-probs (the starting model itself) for pairs that lack them; returns how many."""
    todo = [p for p in pairs if p["ref_w"] is None or p["ref_l"] is None]
    if not todo:
        return 0
    from pipeline.model.logprobs import batched_logprobs
    from pipeline.model.loading import load_model

    model = load_model(model_path, "float32").eval()
    prompts = [p["prompt_ids"] for p in todo]
    w, _ = batched_logprobs(model, prompts, [p["chosen_ids"] for p in todo], pad_id, 16, max_length=max_length)
    l, _ = batched_logprobs(model, prompts, [p["rejected_ids"] for p in todo], pad_id, 16, max_length=max_length)
    for p, a, b in zip(todo, w, l):
        p["ref_w"], p["ref_l"] = a, b
    return len(todo)


def check_tokenizer(pairs: list[dict], tok) -> None:
    vocab = len(tok)
    top = max(max(p["prompt_ids"] + p["chosen_ids"] + p["rejected_ids"]) for p in pairs)
    if top >= vocab:
        raise SystemExit(f"pairs hold token id {top} >= the tokenizer's {vocab}: they were made with another "
                         f"tokenizer; pass --pairs synth or the model they were made with")


# ----------------------------------------------------------------------------------------- children
def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _tokens_of(rows: list[dict], max_length: int) -> tuple[int, int, int]:
    """(prompt+chosen+rejected tokens, non-pad positions the policy sees, positions cut by max_length)."""
    pair = seq = full = 0
    for r in rows:
        p, c, j = len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])
        pair += p + c + j
        full += 2 * p + c + j
        seq += min(p + c, max_length) + min(p + j, max_length)
    return pair, seq, full - seq


def _profile_ctx(n: int):
    import contextlib

    if not n:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU])


def child(spec_path: str, config: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    a = spec["args"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    _set_threads(a["threads"])
    torch.manual_seed(a["seed"])
    from pipeline.model.loading import load_model, load_tokenizer

    if not config.startswith("ours"):  # import TRL (and datasets, pandas) before the baseline, like torch for ours
        import trl  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401

    tok = load_tokenizer(spec["model_path"])
    model = load_model(spec["model_path"], "float32")
    rss_loaded, hwm_load = rss_mb(), hwm_mb()
    rows = spec["rows"]  # in step order: rows[s*bs:(s+1)*bs] is step s
    bs, steps, L = a["batch_size"], a["steps"], a["max_length"]
    total_steps = steps + 1
    stamps: list[float] = []
    cpu_stamps: list[float] = []  # process CPU time (all threads): robust to a shared CPU
    out: dict = {"config": config, "steps": steps, "rss_loaded_mb": rss_loaded}
    prof = _profile_ctx(a["profile"])

    if config.startswith("ours"):
        import importlib

        import polars as pl

        from pipeline.config import TrainSettings
        from pipeline.training.batching import step_batches
        from pipeline.training.examples import pair_examples
        from pipeline.training.trainer import RunOptions

        mod, fn = a["ours_fn"].split(":")
        train_preference = getattr(importlib.import_module(mod), fn)

        examples = spec["examples"]
        # train_preference shuffles with step_batches; the parent laid the rows out in that order
        assert [i for b in step_batches(len(examples), bs, 1, a["seed"]) for i in b] == spec["order"]
        ex = pair_examples(pl.DataFrame(examples).with_columns(pl.col("ref_w", "ref_l").cast(pl.Float64)))
        hwm_init, init_s = hwm_mb(), 0.0
        can_reset = reset_hwm()

        def log_fn(step, metrics):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            if step == 0 and a["profile"]:
                prof.__enter__()

        # The benchmark's own settings (the same ones TRL gets below), not the pipeline's params.
        settings = TrainSettings(lr=a["lr"], epochs=1, batch_size=bs, grad_accum=1, max_length=L, seed=a["seed"],
                                 weight_decay=0.0, warmup_steps=0, max_grad_norm=a["max_grad_norm"], bf16=False,
                                 shared_prompt=config == "ours",
                                 probe_every=0, probe_prompts=1, ref_check_tol=0.1, tail="keep", eval_every=0,
                                 eval_train_pairs=0)
        train_preference(model, ex, [("dpo", 1.0, {"beta": a["beta"]})], settings, pad_id=tok.pad_token_id,
                         run=RunOptions(log_fn=log_fn))
        seen = rows
        out["ids_identical_to_ours"] = len(rows)
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
                if len(stamps) == 1 and a["profile"]:
                    prof.__enter__()

        data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
                                  "rejected": [r["rejected"] for r in rows]})
        cfg = DPOConfig(
            output_dir=str(Path(spec_path).parent / f"trl-{config}"), max_steps=total_steps,
            per_device_train_batch_size=bs, gradient_accumulation_steps=1, learning_rate=a["lr"],
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=a["max_grad_norm"],
            beta=a["beta"], loss_type=["sigmoid"], max_length=L, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, seed=a["seed"], data_seed=a["seed"],
            train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
            report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            precompute_ref_log_probs=(config == "trl_precompute"),
        )
        can_reset = reset_hwm()
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Stamp()])
        init_s = time.perf_counter() - t0  # tokenization, reference model load or the precompute pass
        hwm_init = hwm_mb()
        ds = trainer.train_dataset
        seen = [{"prompt_ids": ds[i]["prompt_ids"], "chosen_ids": ds[i]["chosen_ids"],
                 "rejected_ids": ds[i]["rejected_ids"]} for i in range(len(ds))]
        out["ids_identical_to_ours"] = sum(
            s["prompt_ids"] == r["prompt_ids"] and s["chosen_ids"] == r["chosen_ids"]
            and s["rejected_ids"] == r["rejected_ids"] for s, r in zip(seen, rows))
        out["trl_optimizer"] = str(cfg.optim)
        can_reset = reset_hwm() and can_reset
        trainer.train()
    if a["profile"]:
        prof.__exit__(None, None, None)
    hwm_train = hwm_mb()
    if len(stamps) != total_steps:
        raise RuntimeError(f"{config}: {len(stamps)} step stamps for {total_steps} steps")
    seconds = stamps[-1] - stamps[0]  # steps 1..N: the warm-up step 0 ends at stamps[0]
    cpu_s = cpu_stamps[-1] - cpu_stamps[0]
    timed = seen[bs: total_steps * bs]
    tokens, seq_tokens, truncated = _tokens_of(timed, L)
    out.update({
        "tokens": tokens, "seq_tokens": seq_tokens, "truncated_tokens": truncated, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "cpu_s": cpu_s, "tokens_per_cpu_s": tokens / cpu_s,
        "step_s": [b - a_ for a_, b in zip(stamps, stamps[1:])],
        "train_peak_mb": hwm_train - rss_loaded if can_reset else None,
        "abs_peak_mb": max(hwm_load, hwm_init, hwm_train), "init_s": init_s,
        "init_peak_mb": hwm_init, "peak_reset_supported": can_reset, "threads": torch.get_num_threads(),
    })
    if config == "trl_precompute":
        out["precompute_s"] = init_s
    if a["profile"]:
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a["profile"])
    Path(result_path).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent
def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _fmt_table(results: dict[str, dict]) -> str:
    head = f"{'config':<16}{'steps':>6}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'train peak MB':>15}" \
           f"{'abs peak MB':>13}{'init s':>8}{'CPU s':>8}{'tok/CPU-s':>11}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        tp = "n/a" if r["train_peak_mb"] is None else f"{r['train_peak_mb']:.0f}"
        lines.append(f"{name:<16}{r['steps']:>6}{r['tokens']:>9}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}"
                     f"{tp:>15}{r['abs_peak_mb']:>13.0f}{r['init_s']:>8.2f}{r['cpu_s']:>8.1f}{r['tokens_per_cpu_s']:>11.1f}")
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    out = {}
    ours = results.get("ours")
    if not ours:
        return out
    for other in ("trl_default", "trl_precompute"):
        r = results.get(other)
        if not r:
            continue
        out[f"ours/{other}"] = {
            "tokens_per_s": ours["tokens_per_s"] / r["tokens_per_s"],
            "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / r["tokens_per_cpu_s"],
            "train_peak_mb": (ours["train_peak_mb"] / r["train_peak_mb"]
                              if ours["train_peak_mb"] is not None and r["train_peak_mb"] else None),
            "abs_peak_mb": ours["abs_peak_mb"] / r["abs_peak_mb"],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="builtin name, model folder or hf:<id> (default: the builtin SmolLM2-135M-Instruct)")
    ap.add_argument("--pairs", default=None,
                    help="pairs parquet (prompt_ids/chosen_ids/rejected_ids), or 'synth'; default: "
                         "data/pairs.parquet if present, else synth")
    ap.add_argument("--reference", default=None, help="reference parquet (pair_id, ref_w, ref_l); default: "
                    "data/reference.parquet next to the default pairs; missing ones are computed (untimed)")
    ap.add_argument("--n-synth", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="timed optimiser steps (one more warm-up step runs first)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--profile", type=int, default=0, help="print the top-N ops (torch.profiler) of the timed steps")
    ap.add_argument("--ours-fn", default="pipeline.training.trainer:train_preference",
                    help="module:function with train_preference's signature, to try a candidate change of ours")
    ap.add_argument("--verbose", action="store_true", help="show the children's output (TRL's logs, warnings)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--_child", nargs=3, metavar=("SPEC", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        child(*args._child)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configs {bad}; choose from {CONFIGS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.model.loading import load_tokenizer, resolve
    from pipeline.training.batching import step_batches

    model_path = resolve(args.model)
    tok = load_tokenizer(model_path)
    pairs_spec, ref_spec = args.pairs, args.reference
    if pairs_spec is None:
        default = ROOT / "data" / "pairs.parquet"
        pairs_spec = str(default) if default.is_file() else "synth"
        if ref_spec is None and pairs_spec != "synth":
            ref_spec = str(ROOT / "data" / "reference.parquet")
    pairs, source = load_pairs(pairs_spec, ref_spec, tok, args.n_synth, args.seed)
    if not pairs:
        raise SystemExit("no pairs")
    check_tokenizer(pairs, tok)
    n_ref = fill_reference(pairs, model_path, tok.pad_token_id, args.max_length)
    if n_ref:
        source += f"; {n_ref} reference log-prob pairs computed with the model itself (untimed)"

    # (steps + 1) * batch_size examples, cycling through the pairs; both trainers see the same
    # pairs in the same steps: ours shuffles with step_batches, TRL reads them in that order.
    bs, total = args.batch_size, args.steps + 1
    examples = [pairs[i % len(pairs)] for i in range(total * bs)]
    order = [i for b in step_batches(len(examples), bs, 1, args.seed) for i in b]
    rows = []
    for i in order:
        e = examples[i]
        rows.append({"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"],
                     # TRL's text inputs: the chat-templated prompt and the responses (with their EOS)
                     "prompt": tok.decode(e["prompt_ids"]), "chosen": tok.decode(e["chosen_ids"]),
                     "rejected": tok.decode(e["rejected_ids"])})

    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        if any(not c.startswith("ours") for c in configs):
            raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "trl": trl_version, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "device": "cpu"}
    print(f"model {model_path}\npairs {source}\nsteps {args.steps} (+1 warm-up), batch {bs} pairs, "
          f"max_length {args.max_length}, threads {args.threads}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl_version}", flush=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps({"args": {**settings}, "model_path": model_path, "rows": rows,
                                         "examples": examples, "order": order}))
        for config in configs:
            res = Path(tmp) / f"{config}.json"
            env_child = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                         "HF_DATASETS_CACHE": str(Path(tmp) / "hf-datasets"), "TRANSFORMERS_VERBOSITY": "error",
                         "DATASETS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
            print(f"running {config} ...", flush=True)
            t0, load0 = time.perf_counter(), _loadavg()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path), config, str(res)]
            proc = subprocess.run(cmd, env=env_child, cwd=str(ROOT), text=True,
                                  **({} if args.verbose else {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}))
            if proc.returncode != 0 or not res.is_file():
                if proc.stdout:
                    print(proc.stdout[-8000:])
                raise SystemExit(f"{config} failed (exit {proc.returncode})")
            results[config] = json.loads(res.read_text())
            results[config]["wall_s"] = time.perf_counter() - t0
            results[config]["loadavg_1m_before_after"] = [load0, _loadavg()]

    print()
    print(_fmt_table(results))
    rat = ratios(results)
    for name, r in rat.items():
        tp = "n/a" if r["train_peak_mb"] is None else f"{r['train_peak_mb']:.2f}x"
        print(f"{name:<22} tokens/s {r['tokens_per_s']:.2f}x   train peak {tp}   abs peak {r['abs_peak_mb']:.2f}x"
              f"   (tokens/CPU-s {r['tokens_per_cpu_s']:.2f}x)")
    notes = []
    if "trl_precompute" in results:
        notes.append(f"trl_precompute: precompute pass {results['trl_precompute']['precompute_s']:.2f} s "
                     f"(in 'init s', not in the timed loop)")
    for name, r in results.items():
        if r.get("ids_identical_to_ours") != len(rows):
            notes.append(f"{name}: token ids identical to ours for {r.get('ids_identical_to_ours')}/{len(rows)} "
                         f"pairs (tokens counted from its own ids)")
        if r.get("truncated_tokens"):
            notes.append(f"{name}: {r['truncated_tokens']} tokens cut by max_length (still counted in 'tokens')")
        if r.get("trl_optimizer"):
            notes.append(f"{name}: optimizer {r['trl_optimizer']} (TRL default); ours: torch.optim.AdamW fused (FSDP2: foreach)")
    faster = [n for n in ("trl_default", "trl_precompute") if n in results]
    if "ours" in results and faster:
        best = max(faster, key=lambda n: results[n]["tokens_per_s"])
        r = rat[f"ours/{best}"]
        ok_mem = r["train_peak_mb"] is None or r["train_peak_mb"] <= 1.0
        verdict = "MET" if r["tokens_per_s"] >= 2.0 and ok_mem and r["abs_peak_mb"] <= 1.0 else "NOT met"
        notes.append(f"target (>= 2x tokens/s of the faster TRL config, {best}, at no more peak memory): {verdict}")
    loads = {n: r["loadavg_1m_before_after"] for n, r in results.items()}
    notes.append("1-min load average before/after each config (CPU shared when above --threads): "
                 + ", ".join(f"{n} {a:.1f}/{b:.1f}" for n, (a, b) in loads.items() if a is not None))
    for n in notes:
        print(n)
    for name, r in results.items():
        if r.get("profile"):
            print(f"\n--- profile: {name} (timed steps) ---\n{r['profile']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": settings, "environment": env, "pairs": source, "results": results, "ratios": rat}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
