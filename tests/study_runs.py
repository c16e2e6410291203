"""Synthetic runs of a study (pipeline.analysis.study.StudyRun) for the tests of the scenario study and the tuning
mode: held-out pairs whose Δlp_w and Δlp_l are given, greedy answers on test prompts, and the pairs table that
maps each pair to its prompt."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.analysis.study import StudyRun
from pipeline.schema import conform

N_HELD, N_TEST, HELD_OUT_PROMPTS = 40, 60, 50  # scenario_runs: 10 held-out prompts got a pair in no scenario


def pair_eval(
    variant: str, pair_ids: list[str], d_w: np.ndarray, d_l: np.ndarray, dist: np.ndarray | None = None
) -> pl.DataFrame:
    """The evaluate stage's held-out pairs table; ``dist``: their normalised edit distances (default spread
    evenly over [0.05, 0.6])."""
    n = len(pair_ids)
    ref_w, ref_l = np.full(n, -20.0), np.full(n, -25.0)
    return conform(
        pl.DataFrame(
            {
                "pair_id": pair_ids,
                "variant": variant,
                "ref_w": ref_w,
                "ref_l": ref_l,
                "lp_w": ref_w + d_w,
                "lp_l": ref_l + d_l,
                "len_w": 17,
                "len_l": 17,
                "edit_distance_norm": np.linspace(0.05, 0.6, n) if dist is None else dist,
                "distance_bucket": "[0, 1]",
                "ches": 0.0,
                "ches_norm": 0.0,
            }
        ),
        "pair_eval",
    )


def generations(correct: np.ndarray, model: str) -> pl.DataFrame:
    return conform(
        pl.DataFrame(
            {
                "prompt_id": [f"q{i:03d}" for i in range(len(correct))],
                "model": model,
                "text": "",
                "extracted_answer": None,
                "correct": np.asarray(correct, dtype=bool),
            }
        ),
        "generations",
    )


def pair_table(prompts: list[str], scenario: int, chosen_lp: np.ndarray, rejected_lp: np.ndarray) -> pl.DataFrame:
    """One held-out pair per prompt (``h<prompt>-s<k>``) and as many training pairs, with the sides' summed
    log-probs under the starting policy over 10 tokens each."""
    n = len(prompts)
    ids = [f"{p}-s{scenario}" for p in prompts]
    train = [f"t{p}-s{scenario}" for p in prompts]
    return pl.DataFrame(
        {
            "pair_id": ids + train,
            "prompt_id": prompts + [f"t{p}" for p in prompts],
            "split": ["heldout"] * n + ["train"] * n,
            "chosen_policy_logprob": np.concatenate([chosen_lp, chosen_lp]),
            "rejected_policy_logprob": np.concatenate([rejected_lp, rejected_lp]),
            "len_w": 10,
            "len_l": 10,
        },
        schema_overrides={"len_w": pl.Int32, "len_l": pl.Int32},
    )


def scenario_runs(means: dict[int, float], draw: int = 3, covered: dict[int, int] | None = None) -> list[StudyRun]:
    """DPO in each scenario k over seeds 0-2: held-out pairs of the first ``covered[k]`` held-out prompts (all 40
    by default) whose Δlp_w is ``means[k]`` plus a per-prompt effect the scenarios share plus noise."""
    rng = np.random.default_rng(draw)
    held = [f"h{i:03d}" for i in range(N_HELD)]
    prompt_effect = rng.normal(0, 1, N_HELD)
    before = generations(rng.random(N_TEST) < 0.5, "policy")
    runs = []
    for k, mean in means.items():
        n = (covered or {}).get(k, N_HELD)
        table = pair_table(held[:n], k, rng.normal(-2.0 * k, 1.0, n), rng.normal(-4.0 * k, 1.0, n))
        ids = [f"{p}-s{k}" for p in held[:n]]
        for seed in (0, 1, 2):
            d_w = mean + prompt_effect[:n] + rng.normal(0, 1, n)
            runs.append(
                StudyRun(
                    f"x-s{k}-seed{seed}",
                    f"scenario {k}",
                    seed,
                    "dpo",
                    pair_eval("dpo", ids, d_w, rng.normal(-5, 1, n)),
                    before,
                    generations(rng.random(N_TEST) < 0.2, "dpo"),
                    None,
                    table,
                    HELD_OUT_PROMPTS,
                )
            )
    return runs


def variant_runs(seeds=(0, 1, 2), n_pairs=30, n_prompts=80, draw=5) -> list[StudyRun]:
    """dpo falls on the pairs and loses accuracy; dpop keeps both."""
    rng = np.random.default_rng(draw)
    ids = [f"p{i:02d}" for i in range(n_pairs)]
    before = generations(rng.random(n_prompts) < 0.5, "policy")
    runs = []
    for seed in seeds:
        for variant, d_w, right in (("dpo", -3.0, 0.15), ("dpop", 0.2, 0.5)):
            runs.append(
                StudyRun(
                    f"t-d-seed{seed}",
                    "default",
                    seed,
                    variant,
                    pair_eval(variant, ids, d_w + rng.normal(0, 1, n_pairs), rng.normal(-6, 1, n_pairs)),
                    before,
                    generations(rng.random(n_prompts) < right, variant),
                )
            )
    return runs
