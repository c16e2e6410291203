"""Held-out pairs: log-probs of chosen and rejected before and after training, by edit-distance bucket."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import polars as pl

from pipeline.data import tagging


def summarise_pair_eval(df: pl.DataFrame, buckets: Sequence[str]) -> dict:
    """Mean log-probs before/after and the change of lp_w by edit-distance bucket."""
    if len(df) == 0:
        return {"n_pairs": 0}
    d = df.with_columns(
        (pl.col("lp_w") - pl.col("ref_w")).alias("d_w"), (pl.col("lp_l") - pl.col("ref_l")).alias("d_l")
    )
    by_distance: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {
        "n_pairs": len(d),
        "ref_w": d["ref_w"].mean(),
        "ref_l": d["ref_l"].mean(),
        "lp_w": d["lp_w"].mean(),
        "lp_l": d["lp_l"].mean(),
        "delta_w": d["d_w"].mean(),
        "delta_l": d["d_l"].mean(),
        "lp_w_per_token": (d["lp_w"] / d["len_w"]).mean(),
        "lp_l_per_token": (d["lp_l"] / d["len_l"]).mean(),
        "ref_w_per_token": (d["ref_w"] / d["len_w"]).mean(),
        "ref_l_per_token": (d["ref_l"] / d["len_l"]).mean(),
        "displaced_share": (d["d_w"] < 0).mean(),
        "pair_accuracy": (d["d_w"] > d["d_l"]).mean(),
        "by_distance": by_distance,
    }
    for b in buckets:
        sub = d.filter(pl.col("distance_bucket") == b)
        by_distance[b] = (
            {
                "n": len(sub),
                "delta_w": sub["d_w"].mean(),
                "delta_l": sub["d_l"].mean(),
                "displaced_share": (sub["d_w"] < 0).mean(),
            }
            if len(sub)
            else {"n": 0}
        )
    return out


def bucketise(pairs: pl.DataFrame, edges: Sequence[float]) -> pl.Series:
    return pl.Series(
        "distance_bucket", [tagging.bucket_of(v, edges) for v in pairs["edit_distance_norm"]], dtype=pl.String
    )


def last_fixed_scores(fixed: pl.DataFrame | None, pair_ids: Sequence[str]) -> tuple[pl.DataFrame, int] | None:
    """``(pair_id, lp_w, lp_l)`` of the held-out fixed set at the training stage's last scoring (after its last
    step, by the same model that was saved) and that step, when it covers exactly ``pair_ids``; else None
    (fixed sets off, or other pairs)."""
    if fixed is None or fixed.is_empty():
        return None
    held = fixed.filter(pl.col("set") == "heldout")
    if held.is_empty():
        return None
    step = cast(int, held["step"].max())  # polars types max() for any column; this is a non-empty Int64
    last = held.filter(pl.col("step") == step).select("pair_id", "lp_w", "lp_l")
    if sorted(last["pair_id"].to_list()) != sorted(pair_ids):
        return None
    return last, step
