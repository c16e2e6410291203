"""Test accuracy: greedy answers of a policy on the test prompts (and on the validation prompts, where there are
any), checked against the gold answers."""

from __future__ import annotations

from typing import cast

import polars as pl

from pipeline.generation.types import GenerationSettings
from pipeline.judging.answers import is_correct


def greedy_eval(
    sampler, prompts: pl.DataFrame, max_new_tokens: int, label: str, progress: str | None = "greedy eval"
) -> tuple[pl.DataFrame, float]:
    """Greedy answers of ``sampler`` on ``prompts``; returns the generations table and accuracy."""
    settings = GenerationSettings.greedy(max_new_tokens)
    outs = sampler.generate(prompts["prompt"].to_list(), settings, progress=progress)
    rows = []
    for p, cands in zip(prompts.iter_rows(named=True), outs):
        ok, pred, _ = is_correct(cands[0].text, p["answer"])
        rows.append(
            {
                "prompt_id": p["prompt_id"],
                "model": label,
                "text": cands[0].text,
                "extracted_answer": pred,
                "correct": ok,
            }
        )
    df = pl.DataFrame(rows)
    # polars types mean() for any column; a non-empty Boolean column's is a float
    return df, cast(float, df["correct"].mean()) if len(df) else 0.0


def validation_eval(
    sampler, prompts: pl.DataFrame, max_new_tokens: int, label: str, progress: str | None = "validation eval"
) -> tuple[pl.DataFrame, float] | None:
    """:func:`greedy_eval` on the validation prompts (``split`` val) of the ``prompts`` table; None when it has
    none. A call of its own, after the test prompts', so that the test answers do not depend on the
    validation prompts (batches of other prompts can change greedy answers through their padding)."""
    val = prompts.filter(pl.col("split") == "val")
    if val.is_empty():
        return None
    return greedy_eval(sampler, val, max_new_tokens, label, progress=progress)
