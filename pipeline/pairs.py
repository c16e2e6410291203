"""Chosen/rejected pairs from judged candidates, for one of seed 001's scenarios."""

from __future__ import annotations

import hashlib
from collections import Counter

import polars as pl

from pipeline import tagging
from pipeline.logprobs import encode_prompt, encode_response


def is_heldout(prompt_id: str, fraction: float, seed: int) -> bool:
    """Stable split by prompt: the same prompt is held out whatever else is in the set."""
    h = int(hashlib.sha1(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def build_pairs(prompts: pl.DataFrame, candidates: pl.DataFrame, scores: pl.DataFrame,
                selections: pl.DataFrame, tokenizer, scenario: int, heldout_fraction: float,
                seed: int) -> tuple[pl.DataFrame, dict]:
    """One pair per usable prompt; returns the pairs table and counts of what was skipped and why.

    Scenario 1: the judge's best and worst policy samples of a group with a clear winner (tied
    groups are dropped). Scenario 2: the gold solution against the judge's worst policy sample,
    provided that sample is not correct (tied groups qualify: all-wrong groups are the point).
    """
    chosen_src, rejected_src = tagging.SCENARIO_SOURCES[scenario]
    if "other" in (chosen_src, rejected_src):
        raise ValueError(f"pairs.scenario: scenario {scenario} needs samples from another model")
    cand = {(r["prompt_id"], r["candidate_idx"]): r for r in candidates.iter_rows(named=True)}
    corr = {(r["prompt_id"], r["candidate_idx"]): r["correct"] for r in scores.iter_rows(named=True)}
    prm = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    skipped: Counter[str] = Counter()
    rows = []
    for sel in selections.sort("prompt_id").iter_rows(named=True):
        pid = sel["prompt_id"]
        p = prm.get(pid)
        if p is None:
            raise ValueError(f"selections: prompt_id {pid!r} is not in the prompts table")
        if sel["status"] == "failed":
            skipped["judge_failed"] += 1
            continue
        worst = cand[(pid, sel["worst_idx"])]
        if scenario == 1:
            if sel["status"] != "ok":
                skipped["tie"] += 1
                continue
            chosen = cand[(pid, sel["best_idx"])]
            c_ids, c_text, c_lp = list(chosen["token_ids"]), chosen["text"], chosen["logprob_sum"]
            c_correct = corr.get((pid, sel["best_idx"]))
        else:
            if p["solution"] is None:
                skipped["no_gold_solution"] += 1
                continue
            if corr.get((pid, sel["worst_idx"])):
                skipped["worst_is_correct"] += 1
                continue
            c_text = p["solution"]
            c_ids, c_lp, c_correct = encode_response(tokenizer, c_text), None, True
        r_ids = list(worst["token_ids"])
        if c_ids == r_ids:
            skipped["identical"] += 1
            continue
        rows.append({
            "pair_id": f"{pid}-s{scenario}",
            "prompt_id": pid,
            "split": "heldout" if is_heldout(pid, heldout_fraction, seed) else "train",
            "prompt_ids": encode_prompt(tokenizer, p["prompt"]),
            "chosen_ids": c_ids,
            "rejected_ids": r_ids,
            "chosen_text": c_text,
            "rejected_text": worst["text"],
            "chosen_source": chosen_src,
            "rejected_source": rejected_src,
            "chosen_correct": c_correct,
            "rejected_correct": corr.get((pid, sel["worst_idx"])),
            "chosen_sampler_logprob": c_lp,
            "rejected_sampler_logprob": worst["logprob_sum"],
            "scenario": scenario,
            "edit_distance": tagging.edit_distance(c_ids, r_ids),
            "edit_distance_norm": tagging.normalised_distance(c_ids, r_ids),
            "first_diff": tagging.first_difference(c_ids, r_ids),
            "len_w": len(c_ids),
            "len_l": len(r_ids),
        })
    from pipeline.schema import empty, schema_of

    df = pl.DataFrame(rows, schema=schema_of("pairs")) if rows else empty("pairs")
    return df, dict(skipped)
