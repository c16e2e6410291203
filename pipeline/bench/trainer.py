"""Benchmark the preference trainer against TRL's ``DPOTrainer`` (not a test).

The configurations train the same model on the same pairs, in the same per-step batches, for the same
number of steps, each in a fresh process (:mod:`pipeline.bench.trainer_child`) so that memory is
measured per configuration:

- ``ours``: :func:`pipeline.training.trainer.train_preference` with params.yaml's train settings
  (reference log-probs precomputed, the LM head on response positions only, ``train.shared_prompt``);
- ``ours_padded``: the same with ``shared_prompt`` off (each response after its own prompt copy; not run
  unless named in ``--configs``);
- ``trl_default``: ``DPOTrainer`` with its defaults (a reference model forward every step);
- ``trl_precompute``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (its precompute pass runs
  in the trainer's constructor: timed separately, not part of the training-loop time).

Every setting is the train stage's (params.yaml: the variant's loss and train settings, ``train.bf16``,
``train.max_length``, ``policy.dtype``), on the model the train stage trains (``models/policy`` when the
pipeline has run here) and by default on the pipeline's own pairs with the reference stage's log-probs,
so the first step passes the same reference check as the train stage's. TRL runs DPO's sigmoid loss at
the variant's beta (it needs a variant with a single ``dpo`` loss). All on the CPU; no evaluation,
logging or saving; one warm-up step runs first and is not timed.

tokens/s = (prompt + chosen + rejected tokens of the timed steps' pairs, counted from the data) /
training-loop wall time. Memory: ``train peak`` is the peak RSS of the training loop minus the RSS
right after the policy was loaded (a TRL reference model loaded later counts as training memory);
``abs peak`` is the whole child process's peak RSS. ``CPU s`` / ``tok/CPU-s`` use the process CPU time
instead of wall time: a cross-check when other processes share the CPU (then also try ``--threads 1``:
with every core busy, OpenMP threads waiting for a descheduled sibling distort wall times badly).
TRL's configurations need the ``bench`` extra (``pip install -e '.[bench]'``).

    python -m pipeline.bench.trainer --steps 12 --threads 2 --out reports/bench/cpu-2core-trainer.json
    python -m pipeline.bench.trainer --quick --out /tmp/bench-trainer.json     # seconds, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.bench import trainer_data
from pipeline.bench.models import bench_model
from pipeline.bench.process import MemoryLimits, loadavg, run_child, trainer_child_env
from pipeline.settings.params import Params
from pipeline.settings.train import TrainSettings, Variant
from pipeline.training.allocator import LIBS

CONFIGS = ("ours", "ours_padded", "trl_default", "trl_precompute")


@dataclass(frozen=True)
class Sizes:
    steps: int  # timed optimiser steps (one warm-up step runs first)
    n_synth: int  # problems behind synthesized pairs
    batch_size: int | None  # pairs per step; None: the variant's train.batch_size
    configs: tuple[str, ...]


FULL = Sizes(steps=12, n_synth=64, batch_size=None, configs=("ours", "trl_default", "trl_precompute"))
QUICK = Sizes(steps=2, n_synth=8, batch_size=2, configs=("ours",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument(
        "--variant", help="the train.variants entry whose loss and settings run (default: the first one)"
    )
    parser.add_argument(
        "--model",
        help="builtin name, model folder or hf:<id> (default: models/policy, the "
        "model the train stage trains; without it policy.model)",
    )
    parser.add_argument(
        "--pairs",
        help="'pipeline' (data/pairs.parquet's training pairs, with "
        "data/reference.parquet), 'synth' or a pairs parquet; default: pipeline "
        "where the pairs stage has run, else synth",
    )
    parser.add_argument(
        "--reference",
        help="reference parquet (pair_id, ref_w, ref_l) of a --pairs file; missing log-probs are computed, untimed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK.steps} steps of "
        f"{QUICK.batch_size} pairs, configs {','.join(QUICK.configs)}, a tiny random model "
        "where there is no models/policy",
    )
    parser.add_argument("--n-synth", type=int, help=f"problems behind --pairs synth (default {FULL.n_synth})")
    parser.add_argument(
        "--steps", type=int, help=f"timed optimiser steps (default {FULL.steps}; one more warm-up step runs first)"
    )
    parser.add_argument("--batch-size", type=int, help="pairs per optimiser step (default: train.batch_size)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--allocator",
        choices=tuple(LIBS),
        help="both trainers' allocator on a CPU (default: train.runtime.cpu_allocator, as the train stage runs)",
    )
    parser.add_argument(
        "--configs", help=f"comma-separated subset of {','.join(CONFIGS)} (default {','.join(FULL.configs)})"
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="print the top-N ops (torch.profiler) of the timed steps"
    )
    parser.add_argument(
        "--ours-fn",
        default="pipeline.training.trainer:train_preference",
        help="module:function with train_preference's signature, to try a candidate change of ours",
    )
    parser.add_argument("--verbose", action="store_true", help="show the children's output (TRL's logs, warnings)")
    parser.add_argument("--out", help="write the results as JSON here (reports/bench/ keeps recorded runs)")
    return parser


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line with every unset size filled from ``--quick``'s or the full run's sizes."""
    sizes = QUICK if args.quick else FULL
    args.steps = args.steps or sizes.steps
    args.n_synth = args.n_synth or sizes.n_synth
    args.batch_size = args.batch_size or sizes.batch_size
    configs = [c.strip() for c in (args.configs or ",".join(sizes.configs)).split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    args.configs = ",".join(configs)
    return args


def trl_beta(variant: Variant) -> float:
    """The beta TRL's sigmoid loss runs at: that of the variant's loss, which must be DPO's alone."""
    terms = variant.losses
    if len(terms) != 1 or terms[0].name != "dpo" or terms[0].weight != 1.0:
        raise SystemExit(
            f"TRL's configurations run DPO's sigmoid loss; variant {variant.name!r} trains "
            f"{[(t.name, t.weight) for t in terms]}: pass --variant naming a variant with `loss: dpo`, "
            "or --configs ours"
        )
    return terms[0].hp["beta"]


def config_settings(base: TrainSettings, config: str) -> TrainSettings:
    return base.model_copy(update={"shared_prompt": False}) if config == "ours_padded" else base


def build_spec(args: argparse.Namespace, cfg: Params, variant: Variant, workdir: Path) -> tuple[dict, str]:
    """The children's spec (model, settings and reference log-probs per configuration, pairs, example
    order) and a description of the pairs."""
    from pipeline.model.loading import load_tokenizer

    configs = args.configs.split(",")
    model_path = bench_model(cfg, args.model, quick=args.quick, workdir=workdir)
    if Path(model_path).is_dir():
        model_path = str(Path(model_path).resolve())
    tokenizer = load_tokenizer(model_path)
    pair_set = trainer_data.load_pair_set(
        args.pairs, args.reference, model_path=model_path, tokenizer=tokenizer, cfg=cfg, n_synth=args.n_synth
    )
    if not pair_set.pairs.height:
        raise SystemExit("no pairs")
    trainer_data.check_tokenizer(pair_set.pairs, tokenizer)
    base = variant.settings.model_copy(update={"epochs": 1, "batch_size": args.batch_size})
    settings = {c: config_settings(base, c) for c in configs}
    references, computed, source = {}, {}, pair_set.source
    for config in configs:
        if config.startswith("ours"):
            layout = settings[config].shared_prompt
            if layout not in computed:
                references[layout], computed[layout] = trainer_data.reference_logprobs(
                    pair_set, model_path, cfg, layout
                )
                if computed[layout]:
                    source += (
                        f"; {computed[layout]} reference log-prob pairs computed with the model itself "
                        f"({'shared-prompt' if layout else 'padded'} layout, untimed)"
                    )
    examples, order = trainer_data.step_layout(pair_set.pairs.height, base.batch_size, args.steps + 1, base.seed)
    pairs = trainer_data.child_pairs(pair_set.pairs, tokenizer)
    spec = {
        "model_path": model_path,
        "dtype": cfg.policy.dtype,
        "threads": args.threads,
        "allocator": args.allocator or cfg.train.runtime.cpu_allocator,
        "profile": args.profile,
        "ours_fn": args.ours_fn,
        "steps": args.steps,
        "losses": [t.model_dump() for t in variant.losses],
        "trl_beta": trl_beta(variant) if any(not c.startswith("ours") for c in configs) else None,
        "train": base.model_dump(),
        "settings": {c: s.model_dump() for c, s in settings.items()},
        "architecture": None,
        "reference": {c: references[settings[c].shared_prompt] for c in configs if c.startswith("ours")},
        "precompute": {c: c == "trl_precompute" for c in configs if not c.startswith("ours")},
        "pairs": pairs,
        "examples": examples,
        "order": order,
    }
    return spec, source


def run_children(spec: dict, configs: list[str], workdir: Path, verbose: bool) -> dict[str, dict]:
    """Each configuration in a fresh process; its figures with its wall time and the load around it."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    results: dict[str, dict] = {}
    for config in configs:
        result_path = workdir / f"{config}.json"
        print(f"running {config} ...", flush=True)
        load_before = loadavg()
        run = run_child(
            ["pipeline.bench.trainer_child", str(spec_path), config, str(result_path)],
            trainer_child_env(spec["threads"], workdir / "hf-datasets", spec["allocator"]),
            verbose=verbose,
            limits=MemoryLimits(max_rss_mb=None, min_available_mb=None),
        )
        if run.returncode != 0 or not result_path.is_file():
            print(run.output[-8000:])
            raise SystemExit(f"{config} failed (exit {run.returncode})")
        results[config] = json.loads(result_path.read_text())
        results[config]["wall_s"] = run.seconds
        results[config]["loadavg_1m_before_after"] = [load_before, loadavg()]
    return results


def format_table(results: dict[str, dict]) -> str:
    head = (
        f"{'config':<16}{'steps':>6}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'train peak MB':>15}"
        f"{'abs peak MB':>13}{'init s':>8}{'CPU s':>8}{'tok/CPU-s':>11}"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        train_peak = "n/a" if r["train_peak_mb"] is None else f"{r['train_peak_mb']:.0f}"
        lines.append(
            f"{name:<16}{r['steps']:>6}{r['tokens']:>9}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}"
            f"{train_peak:>15}{r['abs_peak_mb']:>13.0f}{r['init_s']:>8.2f}{r['cpu_s']:>8.1f}"
            f"{r['tokens_per_cpu_s']:>11.1f}"
        )
    return "\n".join(lines)


def ratios(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """ours over each TRL configuration: tokens/s, tokens per CPU-second and peak memory."""
    ours = results.get("ours")
    out: dict[str, dict[str, float | None]] = {}
    for other in ("trl_default", "trl_precompute"):
        theirs = results.get(other)
        if not ours or not theirs:
            continue
        out[f"ours/{other}"] = {
            "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"],
            "train_peak_mb": (
                ours["train_peak_mb"] / theirs["train_peak_mb"]
                if ours["train_peak_mb"] is not None and theirs["train_peak_mb"]
                else None
            ),
            "abs_peak_mb": ours["abs_peak_mb"] / theirs["abs_peak_mb"],
        }
    return out


def notes(results: dict[str, dict], rat: dict, n_rows: int) -> list[str]:
    """What a reader of the table needs besides it: precompute time, token mismatches, truncation,
    optimizers, the target and the load on the machine."""
    out = []
    if "trl_precompute" in results:
        out.append(
            f"trl_precompute: precompute pass {results['trl_precompute']['precompute_s']:.2f} s "
            "(in 'init s', not in the timed loop)"
        )
    for name, r in results.items():
        if "ref_gap_mean" in r:
            out.append(
                f"{name}: first step |lp - ref| {r['ref_gap_per_token']:.3g} nats per token; mean "
                f"{r['ref_gap_mean']:.3g}, max {r['ref_gap_max']:.3g} nats per sequence "
                f"(train.ref_check_tol {r['ref_check_tol']:g})"
            )
        if r.get("ids_identical_to_ours") != n_rows:
            out.append(
                f"{name}: token ids identical to ours for {r.get('ids_identical_to_ours')}/{n_rows} "
                "pairs (tokens counted from its own ids)"
            )
        if r.get("truncated_tokens"):
            out.append(f"{name}: {r['truncated_tokens']} tokens cut by max_length (still counted in 'tokens')")
        if r.get("trl_optimizer"):
            out.append(
                f"{name}: optimizer {r['trl_optimizer']} (TRL default); ours: torch.optim.AdamW fused (FSDP2: foreach)"
            )
    trl = [n for n in ("trl_default", "trl_precompute") if n in results]
    if "ours" in results and trl:
        best = max(trl, key=lambda n: results[n]["tokens_per_s"])
        r = rat[f"ours/{best}"]
        memory_ok = (r["train_peak_mb"] is None or r["train_peak_mb"] <= 1.0) and r["abs_peak_mb"] <= 1.0
        verdict = "MET" if r["tokens_per_s"] >= 2.0 and memory_ok else "NOT met"
        out.append(f"target (>= 2x tokens/s of the faster TRL config, {best}, at no more peak memory): {verdict}")
    loads = {n: r["loadavg_1m_before_after"] for n, r in results.items()}
    out.append(
        "1-min load average before/after each config (CPU shared when above --threads): "
        + ", ".join(f"{n} {a:.1f}/{b:.1f}" for n, (a, b) in loads.items() if a is not None)
    )
    return out


def environment(settings: TrainSettings) -> dict:
    import torch
    import transformers

    from pipeline.model.precision import uses_bf16_autocast

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": "cpu",
        "bf16_autocast": uses_bf16_autocast("cpu", settings.bf16),
    }


def offline_variant(args: argparse.Namespace) -> tuple[Params, Variant]:
    """This process offline (no hub calls), the params of ``--params`` and the variant ``--variant`` names
    (default: the first of ``train.variants``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = Params.load(args.params)
    return cfg, cfg.variant(args.variant or next(iter(cfg.train.variants)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    cfg, variant = offline_variant(args)
    args.variant, args.batch_size = variant.name, args.batch_size or variant.settings.batch_size
    args.pairs = args.pairs or trainer_data.default_pairs()
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        spec, source = build_spec(args, cfg, variant, Path(tmp))
        train = spec["train"]
        env = environment(TrainSettings(**train))
        if env["trl"] is None and any(not c.startswith("ours") for c in configs):
            raise SystemExit("TRL is not installed: pip install -e '.[bench]'")
        print(
            f"model {spec['model_path']}\npairs {source}\nvariant {variant.name}: steps {args.steps} (+1 warm-up), "
            f"batch {train['batch_size']} pairs, max_length {train['max_length']}, bf16 autocast "
            f"{env['bf16_autocast']}, threads {args.threads}, torch {env['torch']}, transformers "
            f"{env['transformers']}, trl {env['trl']}",
            flush=True,
        )
        results = run_children(spec, configs, Path(tmp), args.verbose)
    rat = ratios(results)
    print(f"\n{format_table(results)}")
    for name, r in rat.items():
        train_peak = "n/a" if r["train_peak_mb"] is None else f"{r['train_peak_mb']:.2f}x"
        print(
            f"{name:<22} tokens/s {r['tokens_per_s']:.2f}x   train peak {train_peak}   abs peak "
            f"{r['abs_peak_mb']:.2f}x   (tokens/CPU-s {r['tokens_per_cpu_s']:.2f}x)"
        )
    print("\n".join(notes(results, rat, len(spec["order"]))))
    for name, r in results.items():
        if r.get("profile"):
            print(f"\n--- profile: {name} (timed steps) ---\n{r['profile']}")
    if args.out:
        settings = {**vars(args), "model": spec["model_path"], "train": train, "losses": spec["losses"]}
        payload = {
            "bench": "trainer",
            "settings": settings,
            "environment": env,
            "pairs": source,
            "results": results,
            "ratios": rat,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
