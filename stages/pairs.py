"""Stage `pairs`: chosen/rejected pairs tagged with edit distance, sources and scenario."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import paths
from pipeline.model import loading
from pipeline.cli import run_stage, stage_parser
from pipeline.config import load_params
from pipeline.io import read_table, write_json, write_table
from pipeline.model.logprobs import batched_logprobs
from pipeline.data.pairs import build_pairs, on_policy_summary

log = logging.getLogger("pipeline.data.pairs")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params
    cfg = load_params(args.params)
    params = cfg.pairs
    prompts = read_table(paths.PROMPTS, "prompts")
    candidates = pl.concat([read_table(paths.candidates(src), "candidates") for src in ("policy", "other")])
    scores = read_table(paths.SCORES, "scores")
    selections = read_table(paths.SELECTIONS, "selections")
    tokenizer = loading.load_tokenizer(paths.POLICY_DIR)
    policy = loading.load_model(paths.POLICY_DIR, cfg.policy.dtype, loading.device_for()).eval()

    # Work: pairs of the scenario's sources, each side tagged with its log-prob under the starting policy
    def policy_logprobs(prompt_ids, response_ids):
        return batched_logprobs(policy, prompt_ids, response_ids, tokenizer.pad_token_id, cfg.reference.batch_size,
                                progress="policy log-probs")[0]

    pairs, skipped = build_pairs(prompts, candidates, scores, selections, tokenizer, params.scenario,
                                 params.heldout_fraction, params.seed, policy_logprobs, cfg.judge.min_gap)

    # Outputs
    pairs = write_table(pairs, paths.PAIRS, "pairs")
    n_train = int((pairs["split"] == "train").sum())
    metrics = {"scenario": params.scenario, "n_pairs": len(pairs), "n_train": n_train,
               "n_heldout": len(pairs) - n_train, "skipped": skipped,
               "mean_edit_distance": pairs["edit_distance"].mean(),
               "mean_edit_distance_norm": pairs["edit_distance_norm"].mean(),
               "mean_first_diff": pairs["first_diff"].mean(), "on_policy": on_policy_summary(pairs)}
    write_json(metrics, paths.metrics_file("pairs"))
    log.info("built %d pairs (scenario %d: %d train, %d held out); skipped %s", len(pairs), params.scenario,
             n_train, len(pairs) - n_train, skipped or "none")
    if n_train == 0:
        raise ValueError(f"{paths.PAIRS}: no training pairs (skipped: {skipped}); sample more candidates "
                         "(sample.n), raise sample.temperature, or try another pairs.scenario")


if __name__ == "__main__":
    run_stage(main)
