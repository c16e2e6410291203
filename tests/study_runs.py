"""Synthetic runs of a study (pipeline.analysis.study.StudyRun) for the tests of the scenario study and the tuning
mode: held-out pairs whose Δlp_w and Δlp_l are given, greedy answers on test prompts, and the pairs table that
maps each pair to its prompt."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.schema import conform


def pair_eval(variant: str, pair_ids: list[str], d_w: np.ndarray, d_l: np.ndarray) -> pl.DataFrame:
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
                "edit_distance_norm": np.linspace(0.05, 0.6, n),
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
