"""The study's tuning mode (``python -m pipeline.flows study --tune``): each variant's grid scored on the validation
prompts, the setting it keeps, and the kept settings compared with each other.

- **selection**: each grid point is one training run of one variant on the tuning seed, scored by its greedy
  accuracy on the validation prompts (``prepare.n_val``: neither trained on nor tested), with its Wilson
  interval. A variant keeps its point of highest validation accuracy; a tie goes to the point listed first in
  the grid (``flows.study.tune.grid``, its values' product in order), so that the rule is fixed before any run.
  Greedy accuracy is the criterion because the question the tuning answers is whether a loss's fall of test
  accuracy is a poor setting rather than the loss: it is the figure a mistuned loss would lose, measured on
  prompts that no test figure uses;
- **comparison**: the kept settings trained over the study's seeds, each pair of variants on the same test
  prompts and held-out pairs. Accuracy: per prompt, its share of correct answers over the seeds under one
  variant minus under the other (paired bootstrap interval, Wilcoxon signed-rank test), and per seed the exact
  McNemar test, Holm-adjusted over the seeds. Held-out pairs: per pair the pooled Δlp_w and Δlp_l of one
  minus the other (paired bootstrap, Wilcoxon). The study's own report of the same runs follows it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import polars as pl

from pipeline.analysis import stats
from pipeline.analysis.findings import StatSettings, correctness_pairs, json_safe, verdict
from pipeline.analysis.study import StudyRun, pooled_pairs
from pipeline.analysis.study_report import plain

CRITERION = "greedy accuracy on the validation prompts; a tie goes to the point listed first in the grid"


@dataclass(frozen=True)
class GridPoint:
    """One grid experiment: ``variant`` trained with ``setting`` (train.variants.<variant>.<key> -> value)."""

    experiment: str
    variant: str
    setting: dict[str, Any]
    # greedy answers on the validation prompts (a ``generations`` table); None where the experiment failed
    answers: pl.DataFrame | None

    def accuracy(self) -> float:
        if self.answers is None or self.answers.is_empty():
            return math.nan
        return self.answers["correct"].cast(pl.Float64).mean()


def setting_text(setting: dict[str, Any]) -> str:
    """``{"lr": 1e-05, "beta": 0.1}`` -> ``lr 1e-05, beta 0.1``."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in setting.items())


def select(points: list[GridPoint]) -> dict[str, GridPoint]:
    """Per variant its point of highest validation accuracy; the first in grid order on a tie. A variant whose
    every point failed has none."""
    best: dict[str, GridPoint] = {}
    for p in points:  # in grid order: only a strictly higher accuracy replaces the kept point
        if math.isfinite(p.accuracy()) and (p.variant not in best or p.accuracy() > best[p.variant].accuracy()):
            best[p.variant] = p
    return best


def grid_rows(points: list[GridPoint], selected: dict[str, GridPoint], s: StatSettings) -> list[dict[str, Any]]:
    """Every grid point with its validation accuracy (Wilson interval) and whether it was kept."""
    rows = []
    for p in points:
        correct = 0 if p.answers is None else int(p.answers["correct"].sum())
        n = 0 if p.answers is None else p.answers.height
        rows.append(
            {
                "experiment": p.experiment,
                "variant": p.variant,
                "setting": p.setting,
                "status": "failed" if p.answers is None else "done",
                "val_prompts": n,
                "val_accuracy": stats.wilson(correct, n, level=s.level),
                "selected": selected.get(p.variant) is p,
            }
        )
    return rows


def _share_correct(runs: list[StudyRun]) -> pl.DataFrame:
    """Per test prompt: its share of correct answers over the runs (seeds)."""
    return (
        pl.concat([r.after.select("prompt_id", pl.col("correct").cast(pl.Float64)) for r in runs])
        .group_by("prompt_id")
        .agg(pl.col("correct").mean())
    )


def compare(runs: list[StudyRun], a: str, b: str, s: StatSettings) -> dict[str, Any]:
    """Variant ``b`` against ``a`` on the same test prompts and held-out pairs (pooled over the seeds both ran),
    and per seed the exact McNemar test of ``b`` against ``a``, Holm-adjusted over the seeds."""
    ra, rb = ([r for r in runs if r.variant == v] for v in (a, b))
    acc = _share_correct(ra).join(_share_correct(rb), on="prompt_id", how="inner", suffix="_b")
    acc_diff = (acc["correct_b"] - acc["correct"]).to_numpy()
    pa, pb = pooled_pairs(ra), pooled_pairs(rb)
    j = pa.join(pb, on="pair_id", how="inner", suffix="_b")
    d_w, d_l = (j["d_w_b"] - j["d_w"]).to_numpy(), (j["d_l_b"] - j["d_l"]).to_numpy()
    seeds = sorted({r.seed for r in ra} & {r.seed for r in rb})
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        x = next(r for r in ra if r.seed == seed)
        y = next(r for r in rb if r.seed == seed)
        m = stats.mcnemar_test(
            *correctness_pairs(x.after, y.after, f"seed {seed}: {a} and {b}"),
            level=s.level,
            n_resamples=s.n_resamples,
            seed=s.seed,
        )
        per_seed.append({"seed": seed, "change": m.diff, "only_a": m.only_a, "only_b": m.only_b, "test": m.test})
    for row, p in zip(per_seed, stats.holm([r["test"].p_value for r in per_seed], s.alpha)):
        row["p_holm"] = p
        row["rejects"] = p < s.alpha and row["change"].excludes_zero()
    return {
        "a": a,
        "b": b,
        "seeds": seeds,
        "prompts": len(acc_diff),
        "pairs": len(d_w),
        "accuracy_difference": s.boot(acc_diff),
        "accuracy_test": stats.wilcoxon_test(acc_diff),
        "delta_w_difference": s.boot(d_w),
        "delta_w_test": stats.wilcoxon_test(d_w),
        "delta_l_difference": s.boot(d_l),
        "delta_l_test": stats.wilcoxon_test(d_l),
        "per_seed": per_seed,
    }


def comparisons(runs: list[StudyRun], variants: list[str], s: StatSettings) -> list[dict[str, Any]]:
    """:func:`compare` of every two variants, each later one against each earlier one."""
    return [compare(runs, a, b, s) for a, b in itertools.combinations(variants, 2)]


def tuning_lines(
    grid: dict[str, dict[str, list[Any]]],
    seed: int,
    rows: list[dict[str, Any]],
    policy_val: float | None,
    compared: list[dict[str, Any]],
    s: StatSettings,
) -> list[str]:
    """The tuning's sections of the report: the grid, every point's validation accuracy, the selection, and the
    kept settings compared (the study's own sections follow them)."""
    n_val = max((r["val_prompts"] for r in rows), default=0)
    start = f"; the starting policy answers {100 * policy_val:.1f} % of them" if policy_val is not None else ""
    lines = [
        "## Grid and selection",
        "",
        f"Each variant trained once per point of its grid on train.seed {seed}, scored on {n_val} validation "
        f"prompts (neither trained on nor tested){start}. Criterion: {CRITERION}.",
        "",
        *(
            f"- `{v}`: " + "; ".join(f"{k} ∈ {{{', '.join(map(str, vs))}}}" for k, vs in axes.items())
            for v, axes in grid.items()
        ),
        "",
        "| variant | setting | experiment | validation accuracy | kept |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["val_accuracy"].fmt_share(1) if r["status"] == "done" else "**failed**"
        lines.append(
            f"| {r['variant']} | {setting_text(r['setting'])} | `{r['experiment']}` | {acc} | "
            f"{'**kept**' if r['selected'] else ''} |"
        )
    lines += ["", "## The kept settings compared", ""]
    for c in compared:
        lines += [
            f"`{c['b']}` − `{c['a']}` over seeds {', '.join(map(str, c['seeds']))}:",
            "",
            f"- test accuracy, per prompt its share correct over the seeds ({c['prompts']} prompts): "
            f"{c['accuracy_difference'].fmt(1, 100, ' pts')}, {verdict(c['accuracy_test'], s)};",
            f"- held-out pairs, pooled Δlp_w ({c['pairs']} pairs): {c['delta_w_difference'].fmt()} nats, "
            f"{verdict(c['delta_w_test'], s)}; Δlp_l: {c['delta_l_difference'].fmt()} nats, "
            f"{verdict(c['delta_l_test'], s)};",
            "- per seed, exact McNemar on the same test prompts (p Holm-adjusted over the seeds): "
            + "; ".join(
                f"seed {r['seed']}: {r['change'].fmt(1, 100, ' pts')}, right only under `{c['a']}` {r['only_a']}, "
                f"only under `{c['b']}` {r['only_b']}, p = {stats.fmt_p(r['p_holm'])}"
                f"{' (rejects)' if r['rejects'] else ''}"
                for r in c["per_seed"]
            )
            + ".",
            "",
        ]
    return lines


def tuning_record(
    grid: dict[str, dict[str, list[Any]]],
    seed: int,
    rows: list[dict[str, Any]],
    policy_val: float | None,
    selected: dict[str, GridPoint],
    compared: list[dict[str, Any]],
) -> dict[str, Any]:
    """The tuning's figures for ``summary.json``: the grid, every point, what each variant kept and the
    comparisons of the kept settings."""
    return json_safe(
        {
            "grid": grid,
            "seed": seed,
            "n_val": max((r["val_prompts"] for r in rows), default=0),
            "criterion": CRITERION,
            "policy_val_accuracy": policy_val,
            "points": plain(rows),
            "selected": {
                v: {"experiment": p.experiment, "setting": p.setting, "val_accuracy": p.accuracy()}
                for v, p in selected.items()
            },
            "comparisons": plain(compared),
        }
    )
