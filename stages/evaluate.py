"""Stage `evaluate@<variant>`: greedy test accuracy and held-out pair log-probs after training, against
the starting policy (its accuracy comes from the policy stage, its log-probs from the reference), and the
greedy accuracy on the validation prompts where there are any (``val_accuracy``, per prompt in
``data/eval/<variant>/val_generations.parquet``: what the study's tuning mode selects on). The
held-out log-probs are the training stage's last scoring of its fixed held-out set when it has one
(the same pairs, by the model it saved), else computed here."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from pipeline import paths
from pipeline.analysis.accuracy import greedy_eval, validation_eval
from pipeline.analysis.heldout import bucketise, last_fixed_scores, summarise_pair_eval
from pipeline.cli import run_stage, stage_parser
from pipeline.data import tagging
from pipeline.generation.registry import sampler_for
from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import Sampler
from pipeline.io import read_json, read_table, write_json, write_table
from pipeline.judging.llm.metrics import rubric_eval
from pipeline.model import loading
from pipeline.model.logprobs import pair_logprobs
from pipeline.settings.evaluate import BeforeAndAfter
from pipeline.settings.judge import JudgedPairs
from pipeline.settings.sampling import VLLMParams
from pipeline.settings.train import ReferenceAndTraining

log = logging.getLogger("pipeline.evaluate")


class Settings(ReferenceAndTraining, BeforeAndAfter, JudgedPairs):
    """The sections of params.yaml this stage reads."""

    vllm: VLLMParams


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--variant", required=True)
    args = parser.parse_args(argv)
    # Inputs and params
    cfg = Settings.load(args.params)
    cfg.variant(args.variant)  # an unknown name fails here, naming the key
    params = cfg.evaluate
    all_prompts = read_table(paths.PROMPTS, "prompts")
    prompts = all_prompts.filter(pl.col("split") == "test")
    pairs = read_table(paths.PAIRS, "pairs").filter(pl.col("split") == "heldout")
    ref = read_table(paths.REFERENCE, "reference")
    fixed = (
        read_table(paths.fixed_curves(args.variant), "fixed_curves")
        if Path(paths.fixed_curves(args.variant)).is_file()
        else None
    )
    before = read_json(paths.metrics_file("policy"))
    model_dir = paths.model_dir(args.variant)
    tokenizer = loading.load_tokenizer(model_dir)

    # Work: greedy accuracy (the generation backend gets the device alone), then held-out log-probs
    # against the reference ("before")
    gen, model_id = params.generation, loading.fingerprint(model_dir)
    model = None
    if gen.backend == "transformers":  # one model for both halves
        model = loading.load_model(model_dir, cfg.policy.dtype, loading.device_for()).eval()
        sampler: Sampler = TransformersSampler.from_model(model, tokenizer, model_id, gen.batch_size)
    else:
        sampler = sampler_for(
            gen.backend, model_dir, dtype=cfg.policy.dtype, batch_size=gen.batch_size, vllm=cfg.vllm, model_id=model_id
        )
    try:
        gens, accuracy = greedy_eval(
            sampler, prompts, gen.max_new_tokens, args.variant, progress=f"eval {args.variant}"
        )
        val = validation_eval(sampler, all_prompts, gen.max_new_tokens, args.variant, progress=f"val {args.variant}")
    finally:
        sampler.close()
    after, scored_by = heldout_scores(cfg, args.variant, pairs, fixed, model, tokenizer)
    table = (
        pairs.select("pair_id", "len_w", "len_l", "edit_distance_norm", "ches", "ches_norm")
        .join(ref.select("pair_id", "ref_w", "ref_l"), on="pair_id", how="left")
        .join(after, on="pair_id", how="left")
        .with_columns(pl.lit(args.variant).alias("variant"), bucketise(pairs, cfg.pairs.distance_buckets))
    )
    summary = summarise_pair_eval(table, tagging.bucket_labels(cfg.pairs.distance_buckets))
    rubric = None
    if params.llm_rubric:
        from pipeline.judging.llm.server import JudgeServer
        from pipeline.judging.registry import get_judge

        server = JudgeServer(cfg.judge, "llm")  # judge.llm.serve: the judge's own vLLM server, else inert
        judge = get_judge("llm", min_gap=cfg.judge.min_gap, llm=server.llm, **server.judge_kwargs)
        with server:
            rubric = {**rubric_eval(judge, gens, prompts), "judge": judge.name}

    # Outputs
    write_table(gens, paths.eval_generations(args.variant), "generations")
    write_table(table, paths.eval_table(args.variant), "pair_eval")
    metrics = {
        "variant": args.variant,
        "test_accuracy": accuracy,
        "test_accuracy_before": before["test_accuracy"],
        "heldout": summary,
        "heldout_scored_by": scored_by,
        "llm_rubric": rubric,
    }
    if val is not None:  # only with validation prompts, so that a run without them writes what it always did
        write_table(val[0], paths.eval_val_generations(args.variant), "generations")
        metrics.update(val_accuracy=val[1], n_val=val[0].height)
    write_json(metrics, paths.eval_metrics(args.variant))
    log.info(
        "%s: test accuracy %.1f%% (before %.1f%%); held-out lp_w %s -> %s",
        args.variant,
        100 * accuracy,
        100 * before["test_accuracy"],
        _fmt(summary.get("ref_w")),
        _fmt(summary.get("lp_w")),
    )


def heldout_scores(
    cfg: Settings, variant: str, pairs: pl.DataFrame, fixed: pl.DataFrame | None, model, tokenizer
) -> tuple[pl.DataFrame, str]:
    """The held-out pairs' log-probs after training (pair_id, lp_w, lp_l) and what scored them. The training
    stage scored these pairs after its last step with the model it saved (train.eval_every): those log-probs
    are reused; else they are computed as the reference was (truncation and precision), so that lp − ref is
    the change. ``model``: the trained model, or None when it is not loaded yet."""
    scored = last_fixed_scores(fixed, pairs["pair_id"].to_list())
    if scored is not None:
        return scored[0], f"train@{variant} (fixed held-out set after step {scored[1]})"
    if model is None:  # loaded only now, after the generation engine is gone, and only if needed
        model = loading.load_model(paths.model_dir(variant), cfg.policy.dtype, loading.device_for()).eval()
    lw, ll, _, _ = pair_logprobs(
        model, pairs, tokenizer.pad_token_id, cfg.evaluate.batch_size, cfg.train, progress=f"eval {variant}"
    )
    after = pairs.select("pair_id", pl.Series("lp_w", lw, dtype=pl.Float64), pl.Series("lp_l", ll, dtype=pl.Float64))
    return after, f"evaluate@{variant}"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    run_stage(main)
