"""``reports/bench/README.md``: one table per kind of benchmark, from the JSON files in ``reports/bench/``.

Each benchmark writes one JSON file and says nothing else; this page is the only place its figures are
written out. A file is recognised by its shape, not its name: a sampling bench (``args`` and per-backend
``results`` with tokens per second), the trainer bench (``settings``, per-configuration ``results`` and
``ratios``), the memory bench (``bench: memory`` and per-architecture ``results`` and ``comparison``) or the
GPU checks (``gpus`` and one entry per check). Sampling results that re-scored their
candidates with the training code also fill the log-prob table. A file of any other shape, or one that
is not JSON, gets a row saying so, so that adding a new kind of benchmark never breaks the page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.pages.markdown import NA, count, fixed, number, ratio, table

BENCH_DIR = "reports/bench"
PAGE = f"{BENCH_DIR}/README.md"


def kind_of(data: Any) -> str | None:
    """``sampling``, ``trainer``, ``memory``, ``gpu_check`` or None for a shape this page does not know."""
    if not isinstance(data, Mapping):
        return None
    if data.get("bench") == "memory" and isinstance(data.get("architectures"), Mapping):
        return "memory"
    results = data.get("results")
    if isinstance(data.get("settings"), Mapping) and isinstance(results, Mapping) and "ratios" in data:
        return "trainer"
    if (
        isinstance(data.get("args"), Mapping)
        and isinstance(results, Mapping)
        and any(isinstance(r, Mapping) and "tok_per_s" in r for r in results.values())
    ):
        return "sampling"
    if isinstance(data.get("gpus"), list) and "quick" in data:
        return "gpu_check"
    return None


def _backends(data: Mapping) -> list[tuple[str, Mapping]]:
    return [(name, r) for name, r in data["results"].items() if isinstance(r, Mapping) and "tok_per_s" in r]


def _engine(backend: str, args: Mapping, result: Mapping) -> str:
    if backend != "vllm":
        return f"batch {count(args.get('batch_size'))} sequences"
    parts = [
        "compiled" if args.get("compiled") else "eager",
        f"max_num_seqs {count(args.get('max_num_seqs')) if args.get('max_num_seqs') else 'default'}",
    ]
    if result.get("block_size"):
        parts.append(f"block_size {result['block_size']}")
    if result.get("ld_preload"):
        parts.append("preloaded " + " + ".join(Path(str(p)).name for p in result["ld_preload"]))
    return ", ".join(parts)


def sampling_rows(name: str, data: Mapping) -> list[list[str]]:
    args = data["args"]
    work = f"{count(args.get('prompts'))} × {count(args.get('n'))}, {count(args.get('max_new_tokens'))} tokens"
    return [
        [
            f"`{name}`",
            backend,
            work,
            str(args.get("dtype", NA)),
            _engine(backend, args, r),
            fixed(r.get("startup_s")),
            fixed(r.get("wall_s")),
            count(r.get("tokens")),
            fixed(r.get("tok_per_s")),
            fixed(r.get("end_to_end_s")),
        ]
        for backend, r in _backends(data)
    ]


def speedup_row(name: str, data: Mapping) -> list[str] | None:
    """vLLM against transformers in one run of the bench: tokens per second and end to end."""
    results = data["results"]
    vllm, hf = results.get("vllm"), results.get("transformers")
    if not (isinstance(vllm, Mapping) and isinstance(hf, Mapping)):
        return None
    return [
        f"`{name}`",
        fixed(results.get("ratio_tok_per_s"), 2),
        fixed(ratio(hf.get("end_to_end_s"), vllm.get("end_to_end_s")), 2),
    ]


def logprob_rows(name: str, data: Mapping) -> list[list[str]]:
    rows = []
    for backend, r in _backends(data):
        check = r.get("logprob_check")
        if isinstance(check, Mapping):
            rows.append(
                [
                    f"`{name}`",
                    backend,
                    str(check.get("dtype", NA)),
                    count(check.get("n")),
                    fixed(check.get("mean_abs_diff"), 4),
                    fixed(check.get("mean_abs_diff_per_token"), 5),
                    fixed(check.get("max_abs_diff"), 3),
                ]
            )
    return rows


def trainer_rows(name: str, data: Mapping) -> list[list[str]]:
    s, env = data["settings"], data.get("environment") or {}
    where = (
        f"{env.get('device', NA)}, {count(env.get('cpu_count'))} CPUs, torch {env.get('torch', NA)}, "
        f"TRL {env.get('trl', NA)}"
    )
    shape = (
        f"{count(s.get('steps'))} steps × {count(s.get('batch_size'))} pairs, max length {count(s.get('max_length'))}"
    )
    return [
        [
            f"`{name}`",
            where,
            shape,
            config,
            fixed(r.get("tokens_per_s")),
            fixed(r.get("tokens_per_cpu_s")),
            fixed(r.get("train_peak_mb"), 2, 1 / 1024),
            fixed(r.get("abs_peak_mb"), 2, 1 / 1024),
        ]
        for config, r in data["results"].items()
        if isinstance(r, Mapping)
    ]


def trainer_ratio_rows(name: str, data: Mapping) -> list[list[str]]:
    ratios = data.get("ratios")
    if not isinstance(ratios, Mapping):
        ratios = {}
    return [
        [
            f"`{name}`",
            pair,
            fixed(r.get("tokens_per_s"), 2),
            fixed(r.get("tokens_per_cpu_s"), 2),
            fixed(r.get("train_peak_mb"), 2),
            fixed(r.get("abs_peak_mb"), 2),
        ]
        for pair, r in ratios.items()
        if isinstance(r, Mapping)
    ]


def _memory_side(result: Any) -> tuple[str, str]:
    """(tokens/s, peak GiB) of one configuration of the memory bench, or why it has none."""
    if not isinstance(result, Mapping):
        return NA, NA
    if "out_of_memory" in result:
        return "out of memory", "out of memory"
    if "failed" in result:
        return "failed", "failed"
    return fixed(result.get("tokens_per_s")), fixed(result.get("abs_peak_mb"), 2, 1 / 1024)


def _memory_goal(comparison: Mapping) -> str:
    goal = str(comparison.get("goal", NA))
    if comparison.get("why"):
        goal += f" ({comparison['why']})"
    fits = comparison.get("fits")
    if isinstance(fits, Mapping):
        limit = fixed(fits.get("peak_mb"), 0, 1 / 1024)
        goal += f"; fits {limit} GiB: {'yes' if fits.get('met') else '**no**'}"
    return goal


def memory_rows(name: str, data: Mapping) -> list[list[str]]:
    env, s = data.get("environment") or {}, data.get("settings") or {}
    where = f"{env.get('device', NA)}, {count(env.get('cpu_count'))} CPUs, TRL {env.get('trl', NA)}"
    found_train = s.get("train")
    train: Mapping = found_train if isinstance(found_train, Mapping) else {}
    # files without train.cpu_attention come from runs under the math kernel
    kernel = train.get("cpu_attention", "math") if env.get("bf16_autocast") else None
    shape = (
        f"{count(s.get('batch_size'))} pairs × ~{count(s.get('prompt_tokens'))} + 2 × "
        f"{count(s.get('response_tokens'))} tokens, {count(s.get('steps'))} steps, {s.get('dtype', NA)}"
        + (f", bf16 autocast, ours' attention {kernel}" if kernel else "")
        + f", {s.get('allocator', 'system')} allocator"  # files without one come from runs on the system's
    )
    rows = []
    for arch, entry in data["architectures"].items():
        if not isinstance(entry, Mapping):
            continue
        results, comparisons = entry.get("results") or {}, entry.get("comparison") or {}
        size = f"{arch} ({fixed(entry.get('n_params'), 0, 1e-6)}M)"
        settings = dict.fromkeys(key.split("_", 1)[1] for key in results if "_" in key)
        for setting in settings:
            found = comparisons.get(setting)
            comparison: Mapping = found if isinstance(found, Mapping) else {}
            ours, trl = (_memory_side(results.get(f"{side}_{setting}")) for side in ("ours", "trl"))
            rows.append(
                [
                    f"`{name}`",
                    where,
                    shape,
                    size,
                    setting,
                    ours[0],
                    trl[0],
                    fixed(comparison.get("tokens_per_s"), 2),
                    fixed(comparison.get("tokens_per_cpu_s"), 2),
                    ours[1],
                    trl[1],
                    fixed(comparison.get("abs_peak_mb"), 2),
                    _memory_goal(comparison),
                ]
            )
    return rows


def _outcome(result: Mapping) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if result.get("failed"):
        # a setting too large for the GPU is a figure (where it stops), not a fault
        return "out of GPU memory" if "OutOfMemoryError" in str(result["failed"]) else "failed"
    if "passed" in result:
        return "passed" if result["passed"] else "**failed its check**"
    return "ran"


def _figures(result: Mapping) -> str:
    figures = [
        f"{key} {number(v):.4g}"
        for key, v in result.items()
        if key != "check_s" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return "; ".join(figures) or NA


def gpu_check_rows(name: str, data: Mapping) -> list[list[str]]:
    """A row per check, and one per part of a check that holds its own figures (``large_mfu``'s settings,
    ``bf16_reference``'s two references), named ``check.part``."""
    gpus = ", ".join(data.get("gpus") or []) or "no GPU"
    rows = []
    for check, result in data.items():
        if not isinstance(result, Mapping) or check == "args":  # args: the command line, not a check
            continue
        parts = {key: part for key, part in result.items() if isinstance(part, Mapping)}
        if len(parts) < len(result) - ("check_s" in result):  # figures of its own beside any parts
            rows.append([f"`{name}`", gpus, check, _outcome(result), _figures(result)])
        rows += [[f"`{name}`", gpus, f"{check}.{key}", _outcome(part), _figures(part)] for key, part in parts.items()]
    return rows


def _read(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as e:
        return None, f"not readable as JSON ({type(e).__name__})"


def _unknown(name: str, data: Any, error: str | None) -> list[str]:
    if error:
        return [f"`{name}`", error]
    keys = ", ".join(f"`{k}`" for k in data) if isinstance(data, Mapping) else type(data).__name__
    return [f"`{name}`", f"a shape this page does not know (top level: {keys or 'empty'})"]


SECTIONS = {
    "sampling": (
        "Sampling: transformers and vLLM",
        "Each backend through the pipeline's samplers on the same "
        "prompts, in a fresh process per backend; start-up includes loading the model (and vLLM's engine "
        "and compilation), generate is the timed generation after a warm-up.",
        [
            "file",
            "backend",
            "prompts × n, new tokens",
            "dtype",
            "engine",
            "start-up s",
            "generate s",
            "tokens",
            "tokens/s",
            "end to end s",
        ],
    ),
    "speedup": (
        "vLLM against transformers",
        "Within one run of the sampling bench: the ratio of generation "
        "throughput, and of the whole time including start-up.",
        ["file", "tokens/s ratio", "end-to-end ratio"],
    ),
    "logprob": (
        "Sampler against training log-probs",
        "Candidates re-scored by the training code: the absolute "
        "difference of each sequence's summed log-prob, in nats.",
        ["file", "sampler", "dtype", "candidates", "mean per sequence", "mean per token", "max per sequence"],
    ),
    "trainer": (
        "Trainer against TRL's DPOTrainer",
        "The same model trained on the same pairs by each "
        "configuration. Training peak: the training loop's peak resident memory above the loaded "
        "policy; process peak: the whole process's.",
        [
            "file",
            "machine",
            "run",
            "configuration",
            "tokens/s",
            "tokens per CPU s",
            "training peak GiB",
            "process peak GiB",
        ],
    ),
    "trainer_ratio": (
        "Trainer ratios",
        "Ours over the other configuration, within one run of the bench.",
        ["file", "ratio", "tokens/s", "tokens per CPU s", "training peak", "process peak"],
    ),
    "memory": (
        "Memory: full fine-tune, checkpointing and LoRA against TRL's DPOTrainer",
        "Random-weight SmolLM2 architectures trained by each trainer at each setting (full: every weight; "
        "ckpt: activation checkpointing; lora: a LoRA adapter; lora_ckpt: both), each in a fresh process. Peak: "
        "the process's peak resident memory; ratios are ours over TRL within one run. Goal: ours at no more "
        "peak and at least 1.5× the tokens/s; out of memory: above the run's memory ceiling. Under bf16 autocast "
        "ours runs the attention kernel train.cpu_attention names (math or flash); TRL runs SDPA's own choice, "
        "the flash kernel. Both run on the allocator the run names (train.runtime.cpu_allocator: tcmalloc, or "
        "the system's glibc malloc).",
        [
            "file",
            "machine",
            "run",
            "architecture",
            "setting",
            "ours tokens/s",
            "TRL tokens/s",
            "tokens/s ratio",
            "tokens per CPU s ratio",
            "ours peak GiB",
            "TRL peak GiB",
            "peak ratio",
            "goal",
        ],
    ),
    "gpu_check": (
        "GPU checks",
        "One row per check of the GPU check script; its numeric figures as recorded.",
        ["file", "GPUs", "check", "outcome", "figures"],
    ),
    "unknown": ("Other files", "Files this page cannot read.", ["file", "why"]),
}


def bench_page(root: Path) -> str:
    rows: dict[str, list[list[str]]] = {k: [] for k in SECTIONS}
    for path in sorted((root / BENCH_DIR).glob("*.json")):
        data, error = _read(path)
        kind = None if error else kind_of(data)
        if kind == "sampling":
            rows["sampling"] += sampling_rows(path.name, data)
            rows["speedup"] += [r for r in [speedup_row(path.name, data)] if r]
            rows["logprob"] += logprob_rows(path.name, data)
        elif kind == "trainer":
            rows["trainer"] += trainer_rows(path.name, data)
            rows["trainer_ratio"] += trainer_ratio_rows(path.name, data)
        elif kind == "memory":
            rows["memory"] += memory_rows(path.name, data)
        elif kind == "gpu_check":
            rows["gpu_check"] += gpu_check_rows(path.name, data)
        else:
            rows["unknown"].append(_unknown(path.name, data, error))
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m pipeline.pages` from the JSON files in this folder; do not edit it by hand. "
        "Each file is one run of a benchmark, with every setting it ran with: compare figures within one "
        "file, not across machines or runs. How to run the benchmarks: `docs/development.md`.",
        "",
    ]
    if not any(rows.values()):
        lines += ["No benchmark results yet.", ""]
    for key, (title, text, header) in SECTIONS.items():
        if rows[key]:
            lines += [f"## {title}", "", text, "", *table(header, rows[key]), ""]
    return "\n".join(lines)
