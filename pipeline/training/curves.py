"""The curves a training run records at each evaluation, and the per-step means of a fixed set.

:class:`Curves` keeps the rows of the tables ``fixed_curves`` (one per pair of a fixed set) and
``probe_curves`` (one per probe prompt). :func:`fixed_set_means` reduces the fixed sets' rows to
their per-step means: the trainer logs them to dvclive (``fixed_<set>_<name>``) and the report plots
them, so the two show the same numbers. Torch-free: the report imports this module without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl


@dataclass
class Curves:
    """Per-pair rows of the fixed sets and per-prompt rows of the probe at each evaluation step (tables
    ``fixed_curves`` and ``probe_curves``), kept on rank 0 and in checkpoints."""

    fixed: list[dict] = field(default_factory=list)
    probe: list[dict] = field(default_factory=list)


def _row_order_sum(expr: pl.Expr) -> pl.Expr:
    # A running sum adds the rows in their order, one at a time: the means stay the exact numbers
    # that the runs recorded in dvc.lock logged. Polars' own sum adds pairwise and differs in the last bits.
    return expr.cum_sum().last()


def fixed_set_means(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per fixed set and step of ``fixed_curves`` rows, in their order of appearance.

    Means over the set's pairs of ``lp_w``, ``lp_l`` and of each per token; ``delta_w`` and ``delta_l``
    (``lp − ref``) and ``delta_margin`` (``Δw − Δl``); ``displaced_share``: the share with
    ``lp_w < ref_w``; ``log10_grad_ratio``: the median over the pairs that have one (null where none
    has), in float32 and the lower of the two middle values, as ``torch.median`` takes it.
    """
    n = pl.len()
    d_w = pl.col("lp_w") - pl.col("ref_w")
    d_l = pl.col("lp_l") - pl.col("ref_l")
    return rows.group_by("set", "step", maintain_order=True).agg(
        (_row_order_sum(pl.col("lp_w")) / n).alias("lp_w"),
        (_row_order_sum(pl.col("lp_l")) / n).alias("lp_l"),
        (_row_order_sum(pl.col("lp_w") / pl.col("len_w")) / n).alias("lp_w_per_token"),
        (_row_order_sum(pl.col("lp_l") / pl.col("len_l")) / n).alias("lp_l_per_token"),
        (_row_order_sum(d_w) / n).alias("delta_w"),
        (_row_order_sum(d_l) / n).alias("delta_l"),
        ((_row_order_sum(d_w) - _row_order_sum(d_l)) / n).alias("delta_margin"),
        ((d_w < 0).sum() / n).alias("displaced_share"),
        pl.col("log10_grad_ratio").cast(pl.Float32).quantile(0.5, interpolation="lower").alias("log10_grad_ratio"),
    )
