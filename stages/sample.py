"""Stage `sample` / `sample_other`: N candidates per train prompt, from the starting policy
(``--source policy``, params ``sample``) or from another model (``--source other``, params
``sample_other``; only when ``pairs.scenario`` is 3 or 4, else an empty table).

Finished chunks of prompts are kept under ``<section>.cache_dir``, so a stage killed half-way and
rerun samples only what it had not finished. ``--worker`` processes, on this machine or on others that
mount that folder, sample chunks into it alongside the stage (each takes chunks no other holds) and write
no outputs; the stage assembles the table from every chunk, sampling whatever is left itself."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.generation.chunk_store import ChunkFolder
from pipeline.generation.logprob_check import logprob_check
from pipeline.generation.registry import sampler_for
from pipeline.generation.resumable import plan_chunks, sample_chunks
from pipeline.generation.types import Candidate, GenerationSettings
from pipeline.generation.vllm_backend.environment import reexec_with_cpu_preload
from pipeline.io import read_table, write_json, write_table
from pipeline.model import loading
from pipeline.paths import repo_root, resolve_cache_dir
from pipeline.preload import preloaded_libs
from pipeline.schema import empty
from pipeline.settings.base import StageParams
from pipeline.settings.pairs import PairsParams
from pipeline.settings.policy import PolicyParams
from pipeline.settings.sampling import OtherSampleParams, SampleParams, VLLMParams

log = logging.getLogger("pipeline.sample")


class Settings(StageParams):
    """The sections of params.yaml this stage reads."""

    sample: SampleParams
    sample_other: OtherSampleParams
    policy: PolicyParams
    pairs: PairsParams
    vllm: VLLMParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--source", choices=["policy", "other"], default="policy")
    parser.add_argument(
        "--worker",
        action="store_true",
        help="sample chunks into <section>.cache_dir until every chunk is finished; write no outputs",
    )
    args = parser.parse_args(argv)
    # Inputs and params
    cfg = Settings.load(args.params)
    params = cfg.sample if args.source == "policy" else cfg.sample_other
    out_path, metrics_path = (
        paths.candidates(args.source),
        paths.metrics_file("sample" if args.source == "policy" else "sample_other"),
    )
    prompts = read_table(paths.PROMPTS, "prompts").filter(pl.col("split") == "train").sort("prompt_id")
    if args.source == "other" and cfg.pairs.scenario not in (3, 4):
        if args.worker:
            log.info("pairs.scenario %d uses no other-model samples; nothing to sample", cfg.pairs.scenario)
            return
        write_table(empty("candidates"), out_path, "candidates")
        write_json(
            {"source": "other", "sampled": False, "reason": f"pairs.scenario is {cfg.pairs.scenario}"}, metrics_path
        )
        log.info("pairs.scenario %d uses no other-model samples; wrote an empty %s", cfg.pairs.scenario, out_path)
        return
    if params.backend == "vllm" and argv is None:  # run as the stage's process, not called by a test
        reexec_with_cpu_preload("stages.sample", sys.argv[1:])  # vLLM's CPU build: tcmalloc, Intel OpenMP
    model_path = paths.POLICY_DIR if args.source == "policy" else loading.resolve(cfg.sample_other.model)

    # Work: sample in resumable chunks, then re-score a few candidates with the training code
    model_id = loading.fingerprint(model_path)
    if args.worker:
        _, resume, cache_dir = sample_candidates(cfg, params, args.source, model_path, model_id, prompts, collect=False)
        done_here = resume["chunks"] - resume["chunks_reused"]
        log.info("worker: every chunk in %s is finished, %d of %d sampled here", cache_dir, done_here, resume["chunks"])
        return
    outs, resume, cache_dir = sample_candidates(cfg, params, args.source, model_path, model_id, prompts, collect=True)
    flat = [(p, c) for p, cands in zip(prompts["prompt"], outs) for c in cands]
    picked = random.Random(params.seed).sample(flat, min(params.logprob_check, len(flat)))
    check = logprob_check(
        model_path, cfg.policy.dtype, [p for p, _ in picked], [c for _, c in picked], batch_size=params.batch_size
    )

    # Outputs
    df = write_table(candidate_rows(prompts, outs, args.source, model_id), out_path, "candidates")
    metrics = {
        "source": args.source,
        "sampled": True,
        "backend": params.backend,
        "n_prompts": len(prompts),
        "n_candidates": len(df),
        "mean_tokens": df["num_tokens"].mean(),
        "stopped_share": (df["finish_reason"] == "stop").mean(),
        "mean_logprob": df["logprob_sum"].mean(),
        "model_fingerprint": model_id,
        "resume": resume,
        "sampler_vs_training_logprob": check,
        "ld_preload": preloaded_libs(),
    }
    write_json(metrics, metrics_path)
    log.info(
        "sampled %d candidates for %d prompts with %s (mean %.1f tokens, %.0f%% stopped; %d/%d chunks "
        "reused from %s); sampler vs training log-prob: mean |diff| %.4f over %d candidates",
        len(df),
        len(prompts),
        params.backend,
        metrics["mean_tokens"],
        100 * metrics["stopped_share"],
        resume["chunks_reused"],
        resume["chunks"],
        cache_dir,
        check.get("mean_abs_diff", float("nan")),
        check["n"],
    )


def candidate_rows(prompts: pl.DataFrame, outs: list[list[Candidate]], source: str, model_id: str) -> pl.DataFrame:
    """The candidates table: one row per candidate, in prompt order."""
    return pl.DataFrame(
        [
            {
                "prompt_id": pid,
                "candidate_idx": k,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "num_tokens": len(c.token_ids),
                "logprob_sum": c.logprob_sum,
                "finish_reason": c.finish_reason,
                "source": source,
                "model": model_id,
            }
            for pid, cands in zip(prompts["prompt_id"], outs)
            for k, c in enumerate(cands)
        ]
    )


def sample_candidates(
    cfg: Settings,
    params: SampleParams,
    source: str,
    model_path: str,
    model_id: str,
    prompts: pl.DataFrame,
    *,
    collect: bool,
) -> tuple[list[list[Candidate]], dict[str, Any], Path]:
    """Every prompt's candidates (``collect``; else none: a worker), sampled in chunks that a rerun reuses and
    that other processes sharing the chunk folder sample alongside; with the resume record (the chunk folder
    relative to the repository root) and the chunk folder."""
    settings = GenerationSettings(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        seed=params.seed,
    )
    identity = {
        "model": model_id,
        "backend": params.backend,
        "dtype": cfg.policy.dtype,
        **({"batch_size": params.batch_size} if params.backend == "transformers" else {}),
    }
    plan = plan_chunks(
        prompts["prompt_id"].to_list(), prompts["prompt"].to_list(), settings, params.chunk_size, identity
    )
    cache_dir = resolve_cache_dir(params.cache_dir, env_var=None) / source
    outs, resume = sample_chunks(
        lambda: sampler_for(
            params.backend,
            model_path,
            dtype=cfg.policy.dtype,
            batch_size=params.batch_size,
            vllm=cfg.vllm,
            model_id=model_id,
        ),
        plan,
        ChunkFolder(cache_dir, params.lease_s),
        collect=collect,
        progress=f"sample {source}",
    )
    # The metrics file is committed: the chunk folder relative to the repository root (None when it
    # lies outside it); the stage's log line names the full path.
    root = repo_root()
    resume["cache_dir"] = cache_dir.relative_to(root).as_posix() if cache_dir.is_relative_to(root) else None
    return outs, resume, cache_dir


if __name__ == "__main__":
    run_stage(main)
