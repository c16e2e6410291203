"""What the pairs stage reports of a ``pairs`` table (metrics/pairs.json): pairs per split, per edit kind and
per edit-distance bucket, the tags' means, and how on-policy the two sides are."""

from __future__ import annotations

from collections import Counter
from typing import Any

import polars as pl

from pipeline.data import tagging
from pipeline.data.pairs import EDIT_SOURCE


def on_policy_summary(pairs: pl.DataFrame) -> dict:
    """How on-policy the pairs are: mean per-token log-prob of each side under the starting policy,
    and, for sides the policy sampled itself, how far the sampler's log-prob is from the policy's."""
    if len(pairs) == 0:
        return {}
    out: dict[str, Any] = {}
    for side, n in (("chosen", "len_w"), ("rejected", "len_l")):
        out[f"{side}_policy_logprob_per_token"] = (pairs[f"{side}_policy_logprob"] / pairs[n]).mean()
        own = pairs.filter(pl.col(f"{side}_source") == "policy")
        if len(own):
            d = (own[f"{side}_sampler_logprob"] - own[f"{side}_policy_logprob"]).abs()
            out[f"{side}_sampler_vs_policy_abs_diff"] = {"mean": d.mean(), "max": d.max(), "n": len(own)}
    return out


def summarise_pairs(pairs: pl.DataFrame, distance_buckets: list[float]) -> dict:
    """What a pairs table holds, for the stage's metrics: pairs per split, per edit kind and per edit-distance
    bucket, the tags' means, and how on-policy the sides are."""
    n_train = int((pairs["split"] == "train").sum())
    edit_kinds = pairs.filter(pl.col("rejected_source").str.starts_with(f"{EDIT_SOURCE}:"))["rejected_source"].to_list()
    return {
        "edits": dict(sorted(Counter(edit_kinds).items())),
        "by_distance_bucket": {
            split: dict(
                sorted(
                    Counter(
                        tagging.bucket_of(v, distance_buckets)
                        for v in pairs.filter(pl.col("split") == split)["edit_distance_norm"]
                    ).items()
                )
            )
            for split in ("train", "heldout")
        },
        "n_pairs": len(pairs),
        "n_train": n_train,
        "n_heldout": len(pairs) - n_train,
        "mean_edit_distance": pairs["edit_distance"].mean(),
        "mean_edit_distance_norm": pairs["edit_distance_norm"].mean(),
        "mean_first_diff": pairs["first_diff"].mean(),
        "on_policy": on_policy_summary(pairs),
        "mean_ches": pairs["ches"].mean(),
        "mean_ches_norm": pairs["ches_norm"].mean(),
    }
