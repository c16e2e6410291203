"""Stage `sample`: N candidates per train prompt from the starting policy."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import modeling, paths
from pipeline.cli import setup_logging, stage_parser
from pipeline.config import load_params
from pipeline.io import read_table, write_json, write_table
from pipeline.sampling import GenerationSettings, get_sampler

log = logging.getLogger("pipeline.sample")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    setup_logging()
    # Inputs and params
    cfg = load_params(args.params)
    params = cfg.sample
    prompts = read_table(paths.PROMPTS, "prompts").filter(pl.col("split") == "train")

    # Work
    sampler = get_sampler(params.backend, paths.POLICY_DIR, batch_size=params.batch_size, dtype=cfg.policy.dtype)
    settings = GenerationSettings(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                  max_new_tokens=params.max_new_tokens, seed=params.seed)
    outs = sampler.generate(prompts["prompt"].to_list(), settings)
    rows = [{"prompt_id": pid, "candidate_idx": k, "text": c.text, "token_ids": list(c.token_ids),
             "num_tokens": len(c.token_ids), "logprob_sum": c.logprob_sum, "finish_reason": c.finish_reason,
             "source": "policy", "model": sampler.model_id}
            for pid, cands in zip(prompts["prompt_id"], outs) for k, c in enumerate(cands)]

    # Outputs
    df = write_table(pl.DataFrame(rows), paths.CANDIDATES, "candidates")
    metrics = {"n_prompts": len(prompts), "n_candidates": len(df),
               "mean_tokens": df["num_tokens"].mean(), "stopped_share": (df["finish_reason"] == "stop").mean(),
               "mean_logprob": df["logprob_sum"].mean(), "model_fingerprint": sampler.model_id}
    write_json(metrics, paths.metrics_file("sample"))
    log.info("sampled %d candidates for %d prompts (mean %.1f tokens, %.0f%% stopped)", len(df), len(prompts),
             metrics["mean_tokens"], 100 * metrics["stopped_share"])


if __name__ == "__main__":
    main()
