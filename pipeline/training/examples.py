"""The training examples: each preference pair's token ids with its reference log-probs.

The reference model is never loaded in training: ``ref_w``/``ref_l`` come from the reference stage's
table, joined to the pairs by ``pair_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipeline import paths


@dataclass(frozen=True)
class PairExample:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    ref_w: float
    ref_l: float


def join_reference(pairs: pl.DataFrame, reference: pl.DataFrame) -> pl.DataFrame:
    """``pairs`` (in their order) with the reference log-probs ``ref_w``, ``ref_l`` of each.

    A pair the reference table lacks means that table is older than the pairs: an error, not a
    pair to skip."""
    data = pairs.join(reference.select("pair_id", "ref_w", "ref_l"), on="pair_id", how="left")
    missing = data["ref_w"].null_count()
    if missing:
        raise ValueError(
            f"{paths.REFERENCE}: missing reference log-probs for {missing} pairs; rerun the reference stage"
        )
    return data


def pair_examples(data: pl.DataFrame) -> list[PairExample]:
    """One example per row of ``data``: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``ref_w``, ``ref_l``."""
    return [
        PairExample(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["ref_w"], r["ref_l"])
        for r in data.iter_rows(named=True)
    ]
