"""Stage `pairs`: chosen/rejected pairs tagged with edit distance, sources and scenario."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import modeling, paths
from pipeline.cli import setup_logging, stage_parser
from pipeline.config import load_params
from pipeline.io import read_table, write_json, write_table
from pipeline.pairs import build_pairs

log = logging.getLogger("pipeline.pairs")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    setup_logging()
    # Inputs and params
    params = load_params(args.params).pairs
    prompts = read_table(paths.PROMPTS, "prompts")
    candidates = read_table(paths.CANDIDATES, "candidates")
    scores = read_table(paths.SCORES, "scores")
    selections = read_table(paths.SELECTIONS, "selections")
    tokenizer = modeling.load_tokenizer(paths.POLICY_DIR)

    # Work
    pairs, skipped = build_pairs(prompts, candidates, scores, selections, tokenizer, params.scenario,
                                 params.heldout_fraction, params.seed)

    # Outputs
    pairs = write_table(pairs, paths.PAIRS, "pairs")
    n_train = int((pairs["split"] == "train").sum())
    metrics = {"scenario": params.scenario, "n_pairs": len(pairs), "n_train": n_train,
               "n_heldout": len(pairs) - n_train, "skipped": skipped,
               "mean_edit_distance": pairs["edit_distance"].mean(),
               "mean_edit_distance_norm": pairs["edit_distance_norm"].mean(),
               "mean_first_diff": pairs["first_diff"].mean()}
    write_json(metrics, paths.metrics_file("pairs"))
    log.info("built %d pairs (scenario %d: %d train, %d held out); skipped %s", len(pairs), params.scenario,
             n_train, len(pairs) - n_train, skipped or "none")
    if n_train == 0:
        raise ValueError(f"{paths.PAIRS}: no training pairs (skipped: {skipped}); sample more candidates "
                         "(sample.n), raise sample.temperature, or try pairs.scenario: 2")


if __name__ == "__main__":
    main()
