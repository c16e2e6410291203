"""Greedy accuracy on test prompts and log-probs of held-out pairs before and after training."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from pipeline.judging import rule
from pipeline.data import tagging
from pipeline.model.logprobs import batched_logprobs
from pipeline.generation.sampling import GenerationSettings


def greedy_eval(sampler, prompts: pl.DataFrame, max_new_tokens: int, label: str,
                progress: str | None = "greedy eval") -> tuple[pl.DataFrame, float]:
    """Greedy answers of ``sampler`` on ``prompts``; returns the generations table and accuracy."""
    settings = GenerationSettings(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    outs = sampler.generate(prompts["prompt"].to_list(), settings, progress=progress)
    rows = []
    for p, cands in zip(prompts.iter_rows(named=True), outs):
        ok, pred, _ = rule.is_correct(cands[0].text, p["answer"])
        rows.append({"prompt_id": p["prompt_id"], "model": label, "text": cands[0].text,
                     "extracted_answer": pred, "correct": ok})
    df = pl.DataFrame(rows)
    return df, float(df["correct"].mean()) if len(df) else 0.0


def pair_logprobs(model, pairs: pl.DataFrame, pad_id: int, batch_size: int, max_length: int,
                  progress: str | None = None) -> tuple[list[float], list[float], list[int], list[int]]:
    """Summed log-probs of chosen and rejected of every pair under ``model``."""
    prompts = pairs["prompt_ids"].to_list()
    lw, nw = batched_logprobs(model, prompts, pairs["chosen_ids"].to_list(), pad_id, batch_size, max_length,
                              progress=progress and f"{progress} (chosen)")
    ll, nl = batched_logprobs(model, prompts, pairs["rejected_ids"].to_list(), pad_id, batch_size, max_length,
                              progress=progress and f"{progress} (rejected)")
    return lw, ll, nw, nl


def summarise_pair_eval(df: pl.DataFrame, buckets: Sequence[str]) -> dict:
    """Mean log-probs before/after and the change of lp_w by edit-distance bucket."""
    if len(df) == 0:
        return {"n_pairs": 0}
    d = df.with_columns((pl.col("lp_w") - pl.col("ref_w")).alias("d_w"),
                        (pl.col("lp_l") - pl.col("ref_l")).alias("d_l"))
    out = {
        "n_pairs": len(d),
        "ref_w": d["ref_w"].mean(), "ref_l": d["ref_l"].mean(),
        "lp_w": d["lp_w"].mean(), "lp_l": d["lp_l"].mean(),
        "delta_w": d["d_w"].mean(), "delta_l": d["d_l"].mean(),
        "lp_w_per_token": (d["lp_w"] / d["len_w"]).mean(), "lp_l_per_token": (d["lp_l"] / d["len_l"]).mean(),
        "ref_w_per_token": (d["ref_w"] / d["len_w"]).mean(), "ref_l_per_token": (d["ref_l"] / d["len_l"]).mean(),
        "displaced_share": (d["d_w"] < 0).mean(),
        "pair_accuracy": (d["d_w"] > d["d_l"]).mean(),
        "by_distance": {},
    }
    for b in buckets:
        sub = d.filter(pl.col("distance_bucket") == b)
        out["by_distance"][b] = ({"n": len(sub), "delta_w": sub["d_w"].mean(), "delta_l": sub["d_l"].mean(),
                                  "displaced_share": (sub["d_w"] < 0).mean()} if len(sub) else {"n": 0})
    return out


def bucketise(pairs: pl.DataFrame, edges: Sequence[float]) -> pl.Series:
    return pl.Series("distance_bucket", [tagging.bucket_of(v, edges) for v in pairs["edit_distance_norm"]],
                     dtype=pl.String)


def rubric_eval(judge, generations: pl.DataFrame, prompts: pl.DataFrame) -> dict:
    """Seed 001's "5 points" and "4 & 5 points" rates of greedy answers, scored 1–5 by an LLM judge."""
    from pipeline.judging.llm import rubric_rates

    by_id = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    groups = [rule.Group(r["prompt_id"], by_id[r["prompt_id"]]["prompt"], by_id[r["prompt_id"]]["answer"],
                           (rule.CandidateView(0, r["text"], 0, "stop"),)) for r in generations.iter_rows(named=True)]
    scores = judge.score_candidates(groups)
    return {**rubric_rates(scores.values()), "failed": sum(v is None for v in scores.values())}
