"""Peak memory and speed of full fine-tuning, activation checkpointing and LoRA, against TRL's ``DPOTrainer``
(not a test).

For each architecture (SmolLM2's, random weights: :mod:`pipeline.bench.architectures`) and each setting

- ``full``: every weight trains (``train.lora.r`` 0), no checkpointing;
- ``ckpt``: the same with ``train.gradient_checkpointing``;
- ``lora``: a LoRA adapter of rank ``--lora-r`` (``train.lora``'s other keys) beside the frozen base;
- ``lora_ckpt``: both;

two configurations train the same pairs in the same steps, each in a fresh process
(:mod:`pipeline.bench.trainer_child`, the trainer benchmark's child), so that each peak is its own:

- ``ours_<setting>``: :func:`~pipeline.training.trainer.train_preference` as the train stage runs it (the
  adapter attached as it attaches it, bf16 autocast per ``train.bf16`` with the attention kernel of
  ``--cpu-attention`` (default ``train.cpu_attention``), one row per pair per ``train.shared_prompt``), after
  the pairs' reference log-probs are computed by the reference stage's code path at the same settings
  (untimed), so that its first-step check runs as in the train stage;
- ``trl_<setting>``: TRL's ``DPOTrainer`` at the same settings, with ``peft_config``,
  ``gradient_checkpointing`` and ``precompute_ref_log_probs`` (its precompute pass runs in its constructor,
  untimed).

The pairs are random whole words (:func:`pipeline.bench.trainer_data.word_pairs`): ``--batch-size`` pairs of
about ``--prompt-tokens`` + 2 x ``--response-tokens`` tokens, one step's worth, repeated every step, with
``max_length`` set to the longest pair so that nothing is cut. tokens/s = prompt + chosen + rejected tokens
of the timed steps (every step after one warm-up) over their wall time; peak = the whole process's peak
resident memory (the trainer benchmark's ``abs peak``). The goal, per setting: ours at no more peak memory
than TRL and at least 1.5x its tokens/s; and SmolLM2-1.7B's ``lora_ckpt`` in 8 GiB.

A configuration runs under a ceiling on its resident memory (``--max-rss-gb``; default 90 % of the memory
available when the benchmark starts): one whose weights, gradients and AdamW state alone (a lower bound of
its need) pass it is not started, and one that passes it while running, or leaves the machine less than
``--min-available-gb`` (other processes' memory grows too), is stopped; either is recorded as out of memory,
with the most resident memory seen, and the others run. On a shared machine other processes slow every
configuration: compare the ratios within one run (the JSON records the load average around each one).

    python -m pipeline.bench.memory_bench --archs smollm2-360m --out reports/bench/<name>.json
    python -m pipeline.bench.memory_bench --quick --out /tmp/memory.json     # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench import trainer_data
from pipeline.bench.architectures import ARCHITECTURES, n_params
from pipeline.bench.process import MemoryLimits, available_mb, loadavg, run_child, trainer_child_env
from pipeline.bench.trainer import environment, offline_variant, trl_beta
from pipeline.model.precision import CPU_ATTENTION
from pipeline.settings.train import TrainSettings, Variant
from pipeline.training.allocator import LIBS

# (gradient checkpointing, LoRA) of each setting
SETTINGS = {"full": (False, False), "ckpt": (True, False), "lora": (False, True), "lora_ckpt": (True, True)}
TRAINERS = ("ours", "trl")
# ours and TRL alternate, so that a change of load on a shared machine falls on both sides of a comparison
CONFIGS = tuple(f"{trainer}_{setting}" for setting in SETTINGS for trainer in TRAINERS)
SPEEDUP_GOAL = 1.5  # ours' tokens/s over TRL's, at no more peak memory
# ... and SmolLM2-1.7B's LoRA + checkpointing within 8 GiB
FITS_ARCHITECTURE, FITS_SETTING, FITS_PEAK_MB = "smollm2-1.7b", "lora_ckpt", 8 * 1024


@dataclass(frozen=True)
class Sizes:
    architectures: tuple[str, ...]
    steps: int  # timed optimiser steps (one warm-up step runs first)
    batch_size: int  # pairs per step
    prompt_tokens: int
    response_tokens: int
    configs: tuple[str, ...]


FULL = Sizes(("smollm2-360m", "smollm2-1.7b"), 2, 8, 256, 128, CONFIGS)
QUICK = Sizes(("tiny",), 1, 2, 24, 12, ("ours_full", "ours_lora_ckpt"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--variant", help="the train.variants entry whose loss and settings train (default: the first)")
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run: {QUICK.architectures[0]} model, configs {QUICK.configs}"
    )
    parser.add_argument(
        "--archs", help=f"comma-separated subset of {','.join(ARCHITECTURES)} (default: {FULL.architectures})"
    )
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    parser.add_argument(
        "--steps", type=int, help=f"timed optimiser steps (default {FULL.steps}; one warm-up runs first)"
    )
    parser.add_argument("--batch-size", type=int, help=f"pairs per optimiser step (default {FULL.batch_size})")
    parser.add_argument("--prompt-tokens", type=int, help=f"about this many per prompt (default {FULL.prompt_tokens})")
    parser.add_argument(
        "--response-tokens", type=int, help=f"about this many per response (default {FULL.response_tokens})"
    )
    parser.add_argument("--lora-r", type=int, default=16, help="the adapter's rank in the LoRA settings (default 16)")
    parser.add_argument("--dtype", help="the weights' dtype (default: policy.dtype)")
    parser.add_argument(
        "--cpu-attention",
        choices=CPU_ATTENTION,
        help="ours' attention kernel under bf16 on a CPU (default: train.cpu_attention); TRL runs SDPA's own",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--allocator",
        choices=tuple(LIBS),
        help="both trainers' allocator on a CPU (default: train.runtime.cpu_allocator, as the train stage runs)",
    )
    parser.add_argument(
        "--max-rss-gb", type=float, help="each configuration's memory ceiling (default: 90%% of the memory available)"
    )
    parser.add_argument(
        "--min-available-gb",
        type=float,
        default=2.0,
        help="stop a configuration when the machine has less memory than this left (default 2)",
    )
    parser.add_argument("--verbose", action="store_true", help="show the children's output")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="record each configuration's top-N operators by self CPU time over its timed steps (torch.profiler)",
    )
    parser.add_argument("--out", help="write the results as JSON here, after every configuration")
    return parser


def _subset(value: str | None, default: tuple[str, ...], known, what: str, parser) -> list[str]:
    chosen = [v.strip() for v in (value or ",".join(default)).split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        parser.error(f"unknown or no {what} {unknown}; choose from {', '.join(known)}")
    return chosen


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line with every unset size filled from ``--quick``'s or the full run's sizes."""
    sizes = QUICK if args.quick else FULL
    for key in ("steps", "batch_size", "prompt_tokens", "response_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(sizes, key))
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    args.archs = _subset(args.archs, sizes.architectures, ARCHITECTURES, "architectures", parser)
    args.configs = _subset(args.configs, sizes.configs, CONFIGS, "configs", parser)
    if args.lora_r < 1:
        parser.error("--lora-r must be at least 1")
    return args


def config_settings(base: TrainSettings, config: str, lora_r: int) -> TrainSettings:
    checkpointing, adapter = SETTINGS[config.split("_", 1)[1]]
    lora = base.lora.model_copy(update={"r": lora_r if adapter else 0})
    return base.model_copy(update={"gradient_checkpointing": checkpointing, "lora": lora})


def static_mb(n: int, dtype: str, trains_all: bool) -> float:
    """A lower bound of a configuration's memory: the weights, and for a full fine-tune their gradients and
    AdamW's two moments (all in the weights' dtype); an adapter's share is below 1 % and left out."""
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    return n * size * (4 if trains_all else 1) / 2**20


def build_spec(args: argparse.Namespace, variant: Variant, tokenizer, tokenizer_path: str) -> dict:
    """The children's spec, without its architecture: the pairs, their step layout and each configuration's
    settings (the variant's, at the benchmark's batch and a max_length that cuts nothing)."""
    pairs = trainer_data.word_pairs(tokenizer, args.batch_size, args.prompt_tokens, args.response_tokens, seed=0)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in pairs.select(*trainer_data.IDS).iter_rows())
    base = variant.settings.model_copy(
        update={
            "epochs": 1,
            "batch_size": args.batch_size,
            "max_length": longest,
            "cpu_attention": args.cpu_attention,  # resolved by main: the flag, else train.cpu_attention
        }
    )
    examples, order = trainer_data.step_layout(pairs.height, base.batch_size, args.steps + 1, base.seed)
    return {
        "model_path": tokenizer_path,
        "architecture": None,
        "dtype": args.dtype,
        "threads": args.threads,
        "allocator": args.allocator,
        "profile": args.profile,
        "ours_fn": "pipeline.training.trainer:train_preference",
        "steps": args.steps,
        "losses": [t.model_dump() for t in variant.losses],
        "trl_beta": trl_beta(variant) if any(c.startswith("trl") for c in args.configs) else None,
        "train": base.model_dump(),
        "settings": {c: config_settings(base, c, args.lora_r).model_dump() for c in args.configs},
        "reference": {c: None for c in args.configs if c.startswith("ours")},  # computed by each child
        "precompute": {c: True for c in args.configs if c.startswith("trl")},
        "pairs": trainer_data.child_pairs(pairs, tokenizer),
        "examples": examples,
        "order": order,
    }


def run_config(spec: dict, config: str, workdir: Path, limits: MemoryLimits, verbose: bool) -> dict:
    """One configuration's figures, or why it has none (out of memory, or a failure with its output)."""
    trains_all = not spec["settings"][config]["lora"]["r"]
    need = static_mb(n_params(spec["architecture"]), spec["dtype"], trains_all)
    if limits.max_rss_mb is not None and need > limits.max_rss_mb:
        what = "weights, gradients and AdamW state" if trains_all else "weights"
        return {
            "config": config,
            "out_of_memory": f"estimated: the {what} alone take {need:.0f} MB, above the ceiling of "
            f"{limits.max_rss_mb:.0f} MB (not started)",
        }
    spec_path, result_path = workdir / "spec.json", workdir / f"{config}.json"
    spec_path.write_text(json.dumps(spec))
    load_before = loadavg()
    run = run_child(
        ["pipeline.bench.trainer_child", str(spec_path), config, str(result_path)],
        trainer_child_env(spec["threads"], workdir / f"hf-datasets-{config}", spec["allocator"]),
        verbose=verbose,
        limits=limits,
    )
    around = {"wall_s": run.seconds, "loadavg_1m_before_after": [load_before, loadavg()]}
    if run.out_of_memory:
        return {"config": config, "out_of_memory": run.out_of_memory, "rss_seen_mb": run.rss_seen_mb, **around}
    if run.returncode != 0 or not result_path.is_file():
        return {"config": config, "failed": f"exit {run.returncode}: {run.output[-3000:]}", **around}
    return {**json.loads(result_path.read_text()), **around}


def ran(result: dict | None) -> bool:
    return result is not None and "tokens_per_s" in result


def compare(architecture: str, results: dict[str, dict]) -> dict[str, dict]:
    """Per setting with both configurations: ours over TRL (tokens/s, tokens per CPU-second, peak memory) and
    whether the goal is met; a side that ran out of memory decides it (ours alone fitting meets it)."""
    out: dict[str, dict] = {}
    for setting in SETTINGS:
        ours, trl = results.get(f"ours_{setting}"), results.get(f"trl_{setting}")
        if ours is None or trl is None:
            continue
        if ran(ours) and ran(trl):
            r = {
                "tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
                "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"],
                "abs_peak_mb": ours["abs_peak_mb"] / trl["abs_peak_mb"],
            }
            met = r["tokens_per_s"] >= SPEEDUP_GOAL and r["abs_peak_mb"] <= 1.0
            out[setting] = {**r, "goal": "met" if met else "not met"}
        elif ran(ours) and "out_of_memory" in trl:
            out[setting] = {"goal": "met", "why": "TRL runs out of memory where ours fits"}
        elif ran(trl) and "out_of_memory" in ours:
            out[setting] = {"goal": "not met", "why": "ours runs out of memory where TRL fits"}
        else:
            stopped = [side for side, r in (("ours", ours), ("TRL", trl)) if not ran(r)]
            out[setting] = {"goal": "n/a", "why": f"{' and '.join(stopped)} did not run to the end"}
    fit = results.get(f"ours_{FITS_SETTING}")
    if architecture == FITS_ARCHITECTURE and fit is not None and ran(fit):
        out.setdefault(FITS_SETTING, {})["fits"] = {"peak_mb": FITS_PEAK_MB, "met": fit["abs_peak_mb"] <= FITS_PEAK_MB}
    return out


def format_table(results: dict[str, dict]) -> str:
    head = f"{'config':<16}{'tokens/s':>10}{'tok/CPU-s':>11}{'peak MB':>10}{'train peak MB':>15}{'init s':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if not ran(r):
            lines.append(f"{name:<16}{r.get('out_of_memory') or 'failed'}")
            continue
        train_peak = "n/a" if r["train_peak_mb"] is None else f"{r['train_peak_mb']:.0f}"
        lines.append(
            f"{name:<16}{r['tokens_per_s']:>10.1f}{r['tokens_per_cpu_s']:>11.1f}{r['abs_peak_mb']:>10.0f}"
            f"{train_peak:>15}{r['init_s']:>9.1f}"
        )
    return "\n".join(lines)


def environment_of(args: argparse.Namespace, spec: dict, limits: MemoryLimits) -> dict:
    import peft

    return {
        **environment(TrainSettings(**spec["train"])),
        "peft": peft.__version__,
        "memory_available_mb": available_mb(),
        "max_rss_mb": limits.max_rss_mb,
        "min_available_mb": limits.min_available_mb,
        "threads": args.threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    cfg, variant = offline_variant(args)
    from pipeline.model import loading

    args.variant, args.dtype = variant.name, args.dtype or cfg.policy.dtype
    args.cpu_attention = args.cpu_attention or variant.settings.cpu_attention
    args.allocator = args.allocator or cfg.train.runtime.cpu_allocator
    tokenizer_path = loading.resolve(cfg.policy.model)
    tokenizer = loading.load_tokenizer(tokenizer_path)
    too_small = [a for a in args.archs if ARCHITECTURES[a]["vocab_size"] < len(tokenizer)]
    if too_small:
        raise SystemExit(f"{too_small}: fewer token ids than the tokenizer of policy.model ({len(tokenizer)})")
    available = available_mb()
    limits = MemoryLimits(
        args.max_rss_gb * 1024 if args.max_rss_gb else (0.9 * available if available else None),
        args.min_available_gb * 1024,
    )
    spec = build_spec(args, variant, tokenizer, tokenizer_path)
    payload: dict = {
        "bench": "memory",
        "settings": {**vars(args), "train": spec["train"], "losses": spec["losses"]},
        "environment": environment_of(args, spec, limits),
        "goal": {
            "speedup": SPEEDUP_GOAL,
            "fits": {"architecture": FITS_ARCHITECTURE, "setting": FITS_SETTING, "peak_mb": FITS_PEAK_MB},
        },
        # above --threads, other processes shared the CPU: tokens/s fall, the ratios within the run hold
        "loadavg_1m_before_after": [loadavg(), None],
        "architectures": {},
    }
    if any(c.startswith("trl") for c in args.configs) and payload["environment"]["trl"] is None:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
    print(
        f"pairs: {args.batch_size} x about {args.prompt_tokens} + 2 x {args.response_tokens} tokens, max_length "
        f"{spec['train']['max_length']}; steps {args.steps} (+1 warm-up); variant {variant.name}; {args.dtype}, "
        f"bf16 autocast {payload['environment']['bf16_autocast']}; ceiling "
        f"{'none' if limits.max_rss_mb is None else f'{limits.max_rss_mb:.0f} MB'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for arch in args.archs:
            spec["architecture"] = ARCHITECTURES[arch]
            entry: dict = {"config": ARCHITECTURES[arch], "n_params": n_params(ARCHITECTURES[arch]), "results": {}}
            payload["architectures"][arch] = entry
            for config in args.configs:
                print(f"{arch}: running {config} ...", flush=True)
                entry["results"][config] = run_config(spec, config, Path(tmp), limits, args.verbose)
                entry["comparison"] = compare(arch, entry["results"])
                payload["loadavg_1m_before_after"][1] = loadavg()
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
            print(f"\n{arch} ({entry['n_params'] / 1e6:.0f}M parameters)\n{format_table(entry['results'])}")
            for config, r in entry["results"].items():
                if r.get("profile"):
                    print(f"\n--- profile: {config} (timed steps) ---\n{r['profile']}")
            for setting, c in entry["comparison"].items():
                print(f"  {setting}: {json.dumps(c)}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
