"""The toy model's history (:func:`pipeline.analysis.toy.run_toy`) read out: the final metrics across seeds
(the toy stage's metrics) and one figure per scenario of the probabilities and the gradient ratio over
steps."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, cast

import polars as pl


def final_metrics(df: pl.DataFrame, confidence: float) -> dict[str, Any]:
    """``{loss: {"scenario_<s>": ...}}`` over the seeds: for the chosen, rejected and dispersed
    probabilities the initial, peak and final means, the final level's sd, and the change from the
    initial value (final − initial) with its mean, sd, ``confidence`` t interval and one-sample t test
    (``scipy.stats.ttest_1samp``; none with one seed), and how many seeds rose and fell; the median
    final gradient ratio."""
    from scipy import stats

    out: dict[str, Any] = {}
    per_run = (
        df.sort("step")
        .group_by(["loss", "scenario", "seed"], maintain_order=True)
        .agg(
            *[pl.col(c).first().alias(f"{c}_init") for c in ("p_chosen", "p_rejected", "p_dispersed")],
            *[pl.col(c).last().alias(c) for c in ("p_chosen", "p_rejected", "p_dispersed", "grad_ratio")],
            pl.col("p_chosen").max().alias("p_chosen_peak"),
        )
    )
    for (loss, scenario), g in per_run.group_by(["loss", "scenario"], maintain_order=True):
        m: dict[str, Any] = {"seeds": g.height}
        for c in ("p_chosen", "p_rejected", "p_dispersed"):
            init, final = g[f"{c}_init"].to_numpy(), g[c].to_numpy()
            change = final - init
            m[f"{c}_init"] = float(init.mean())
            if c == "p_chosen":
                m["p_chosen_peak"] = cast(float, g["p_chosen_peak"].mean())  # a Float64 column: a float
            m[c] = float(final.mean())
            m[f"{c}_sd"] = float(final.std(ddof=1)) if len(final) > 1 else None
            m[f"{c}_change"] = float(change.mean())
            m[f"{c}_change_sd"] = float(change.std(ddof=1)) if len(change) > 1 else None
            lo = hi = p = None
            if len(change) > 1 and change.std() > 0:
                t = stats.ttest_1samp(change, 0.0)
                ci = t.confidence_interval(confidence)
                lo, hi, p = float(ci.low), float(ci.high), float(t.pvalue)
            m.update(
                {
                    f"{c}_change_lo": lo,
                    f"{c}_change_hi": hi,
                    f"{c}_change_p": p,
                    f"{c}_rose": int((change > 0).sum()),
                    f"{c}_fell": int((change < 0).sum()),
                }
            )
        ratios = [r for r in g["grad_ratio"].to_list() if r is not None and math.isfinite(r)]
        m["grad_ratio"] = float(sorted(ratios)[len(ratios) // 2]) if ratios else None
        out.setdefault(loss, {})[f"scenario_{scenario}"] = m
    return out


def plot_toy(df: pl.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per scenario (``scenario_<s>.png``): for each loss a panel with the chosen, rejected
    and dispersed probabilities over steps (the mean over seeds, shaded from the lowest seed to the
    highest), and a last panel with the median gradient ratio ``|∂L/∂π(y_l)| / |∂L/∂π(y_w)|`` over
    seeds of every loss (log scale). Files are written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    losses = list(dict.fromkeys(df["loss"].to_list()))
    for scenario in sorted(set(df["scenario"].to_list())):
        sub = (
            df.filter(pl.col("scenario") == scenario)
            .group_by(["loss", "step"])
            .agg(
                *[pl.col(c).mean().alias(c) for c in ("p_chosen", "p_rejected", "p_dispersed")],
                *[pl.col(c).min().alias(f"{c}_lo") for c in ("p_chosen", "p_rejected", "p_dispersed")],
                *[pl.col(c).max().alias(f"{c}_hi") for c in ("p_chosen", "p_rejected", "p_dispersed")],
                pl.col("grad_ratio").median(),
            )
            .sort("step")
        )
        n = len(losses) + 1
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        flat = axes.ravel()
        for ax, loss in zip(flat, losses):
            d = sub.filter(pl.col("loss") == loss)
            for c, label, color in (
                ("p_chosen", "chosen", "tab:green"),
                ("p_rejected", "rejected", "tab:red"),
                ("p_dispersed", "dispersed", "tab:blue"),
            ):
                ax.plot(d["step"], d[c], label=label, color=color)
                ax.fill_between(d["step"], d[f"{c}_lo"], d[f"{c}_hi"], color=color, alpha=0.2, linewidth=0)
            ax.set_title(loss)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("step")
        flat[0].legend(fontsize=7)
        ax = flat[len(losses)]
        for loss in losses:
            d = sub.filter(pl.col("loss") == loss)
            ax.plot(d["step"], d["grad_ratio"], label=loss)
        ax.set_yscale("log")
        ax.set_title("|dL/dπ(y_l)| / |dL/dπ(y_w)|")
        ax.set_xlabel("step")
        ax.legend(fontsize=6, ncol=2)
        for extra in flat[n:]:
            extra.axis("off")
        fig.suptitle(f"toy model, scenario {scenario} ({df['seed'].n_unique()} seeds: mean and range)")
        fig.tight_layout()
        path = out_dir / f"scenario_{scenario}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        written.append(path)
    return written
