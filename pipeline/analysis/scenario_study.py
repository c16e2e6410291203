"""A study over the data scenarios (``python -m pipeline.flows study --scenarios 1 2 3 4``): per scenario how
on-policy its pairs are, the test-accuracy change per seed, and claim 3 of docs/losses.md, the ordering.

The scenarios share the held-out prompts (the pairs stage holds prompts out by a seeded hash of their id, so the
same prompts in every scenario) and the test prompts; a scenario has a held-out pair only where it made one of
that prompt. Three views, each from scipy or statsmodels through :mod:`pipeline.analysis.stats`:

- **pairs**: per scenario the held-out prompts with a pair (of the shared held-out set), the training pairs, and
  the on-policy measures: each side's mean per-token log-prob under the starting policy (as ``metrics/pairs.json``
  reports it), over the scenario's pairs (each pair averaged over the experiments that made it), with a
  bootstrap interval;
- **accuracy per seed**: the exact McNemar test of each run against the starting policy on the same test
  prompts, Holm-adjusted over the seeds of a scenario and variant (``statsmodels`` ``multipletests``). McNemar
  needs one answer per prompt and model, so it is per seed: pooling the seeds' answers into one table would
  count a prompt once per seed as if the seeds' answers were independent prompts. The pooled test over seeds is
  the study's own (each prompt's share of correct answers over the seeds minus its answer before, Wilcoxon);
- **ordering** (claim 3: scenario 1, both sides sampled from the policy, shows the mildest displacement, i.e.
  DPO's Δlp_w is highest there): for each other scenario k, on the held-out prompts with a pair in both, the
  per-prompt difference of pooled Δlp_w (scenario 1 − k) with a paired bootstrap interval at the Bonferroni
  level 1 − (1 − level)/m and the Wilcoxon signed-rank test, Holm-adjusted over the m comparisons. The claim is
  **reproduced** only where scenario 1 is significantly higher than every other scenario, **contradicted**
  where some other scenario is significantly higher than scenario 1, and **not significant** otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from pipeline.analysis import stats
from pipeline.analysis.findings import StatSettings, correctness_pairs
from pipeline.analysis.study import Claim, StudyRun, judge_claim, pooled_pairs


def scenario_number(pair_set: str) -> int | None:
    """``"scenario 3"`` -> 3; the default pair set (``pairs.source`` of params.yaml) -> None."""
    head, _, k = pair_set.partition(" ")
    return int(k) if head == "scenario" and k.isdigit() else None


def scenario_sets(runs: list[StudyRun]) -> list[str]:
    """The study's pair sets that are scenarios, by number."""
    return sorted({r.scenario for r in runs if scenario_number(r.scenario) is not None}, key=lambda k: k.split()[-1])


def _one_per_experiment(runs: list[StudyRun]) -> list[StudyRun]:
    """One run of each experiment (its variants share the experiment's pairs)."""
    seen: dict[str, StudyRun] = {}
    for r in runs:
        seen.setdefault(r.experiment, r)
    return list(seen.values())


def _pair_tables(runs: list[StudyRun]) -> pl.DataFrame | None:
    """The pairs of the experiments of ``runs``, each pair's columns averaged over the experiments that made it."""
    parts = [r.pair_table for r in _one_per_experiment(runs) if r.pair_table is not None]
    if not parts:
        return None
    return (
        pl.concat(parts)
        .with_columns(
            (pl.col("chosen_policy_logprob") / pl.col("len_w")).alias("chosen_per_token"),
            (pl.col("rejected_policy_logprob") / pl.col("len_l")).alias("rejected_per_token"),
        )
        .group_by("pair_id")
        .agg(
            pl.col("prompt_id").first(),
            pl.col("split").first(),
            pl.col("chosen_per_token").mean(),
            pl.col("rejected_per_token").mean(),
        )
        .sort("pair_id")
    )


def pair_set_rows(runs: list[StudyRun], s: StatSettings) -> list[dict[str, Any]]:
    """Per scenario: its experiments, the shared held-out prompts and those with a pair, the pairs per split,
    and each side's mean per-token log-prob under the starting policy with its bootstrap interval."""
    rows = []
    for sc in scenario_sets(runs):
        rs = [r for r in runs if r.scenario == sc]
        pairs = _pair_tables(rs)
        held = sorted({r.heldout_prompts for r in rs if r.heldout_prompts is not None})
        row: dict[str, Any] = {
            "scenario": sc,
            "experiments": sorted({r.experiment for r in rs}),
            "heldout_prompts": held[0] if len(held) == 1 else None,
        }
        if pairs is not None:
            heldout = pairs.filter(pl.col("split") == "heldout")
            row |= {
                "train_pairs": int((pairs["split"] == "train").sum()),
                "heldout_pairs": heldout.height,
                "heldout_prompts_with_pair": heldout["prompt_id"].n_unique(),
                "chosen_per_token": s.boot(pairs["chosen_per_token"].to_numpy()),
                "rejected_per_token": s.boot(pairs["rejected_per_token"].to_numpy()),
            }
        rows.append(row)
    return rows


def mcnemar_rows(runs: list[StudyRun], s: StatSettings) -> list[dict[str, Any]]:
    """Per scenario, variant and seed: the exact McNemar test of the run against the starting policy on the test
    prompts, with the accuracy change (paired bootstrap interval) and the p-value Holm-adjusted over the seeds."""
    rows = []
    for sc in scenario_sets(runs):
        for variant in sorted({r.variant for r in runs}):
            rs = sorted((r for r in runs if r.scenario == sc and r.variant == variant), key=lambda r: r.seed)
            tests = [
                stats.mcnemar_test(
                    *correctness_pairs(r.before, r.after, f"{r.experiment} {variant}"),
                    level=s.level,
                    n_resamples=s.n_resamples,
                    seed=s.seed,
                )
                for r in rs
            ]
            adjusted = stats.holm([m.test.p_value for m in tests], s.alpha)
            for r, m, p in zip(rs, tests, adjusted):
                rows.append(
                    {
                        "scenario": sc,
                        "variant": variant,
                        "seed": r.seed,
                        "prompts": m.n,
                        "only_before": m.only_a,
                        "only_after": m.only_b,
                        "change": m.diff,
                        "test": m.test,
                        "p_holm": p,
                        "rejects": p < s.alpha and m.diff.excludes_zero(),
                    }
                )
    return rows


def prompt_deltas(runs: list[StudyRun]) -> pl.DataFrame | None:
    """Per held-out prompt: pooled Δlp_w of its pair (averaged over the seeds; over its pairs, should a prompt
    have several); None without the pairs table that maps pairs to prompts."""
    pairs = _pair_tables(runs)
    if pairs is None:
        return None
    return (
        pooled_pairs(runs)
        .join(pairs.select("pair_id", "prompt_id"), on="pair_id", how="inner")
        .group_by("prompt_id")
        .agg(pl.col("d_w").mean())
        .sort("prompt_id")
    )


def _seeds_ordered(runs: list[StudyRun], dpo: str, first: str) -> str:
    """In how many seeds (with every scenario run) DPO's mean Δlp_w is highest in scenario ``first``."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.variant == dpo:
            by_seed.setdefault(r.seed, {})[r.scenario] = float((r.pairs["lp_w"] - r.pairs["ref_w"]).mean())
    sets = set(scenario_sets(runs))
    full = [m for m in by_seed.values() if set(m) == sets]
    return f"{sum(1 for m in full if max(m, key=lambda k: m[k]) == first)} of {len(full)}"


def ordering_claims(runs: list[StudyRun], dpo: str, s: StatSettings) -> list[Claim]:
    """Claim 3 for the DPO variant ``dpo``: one row per comparison of scenario 1 with another scenario, and
    one row for the claim as a whole (its verdict from all of them). None without scenario 1 and another."""
    sets = scenario_sets([r for r in runs if r.variant == dpo])
    if "scenario 1" not in sets or len(sets) < 2:
        return []
    deltas = {sc: prompt_deltas([r for r in runs if r.variant == dpo and r.scenario == sc]) for sc in sets}
    first = deltas["scenario 1"]
    others = [sc for sc in sets if sc != "scenario 1"]
    if first is None or any(deltas[sc] is None for sc in others):
        return []
    m = len(others)
    level = 1 - (1 - s.level) / m
    diffs, raw = {}, []
    for sc in others:
        j = first.join(deltas[sc], on="prompt_id", how="inner", suffix="_k")  # type: ignore[arg-type]
        diffs[sc] = (j["d_w"] - j["d_w_k"]).to_numpy()
        raw.append(stats.wilcoxon_test(diffs[sc]))
    adjusted = stats.holm([t.p_value for t in raw], s.alpha)
    seeds = _seeds_ordered(runs, dpo, "scenario 1")
    rows = [
        Claim(
            f"{dpo} (DPO): lp_w falls less in scenario 1 (policy/policy) than in {sc}",
            "claim 3",
            f"scenario 1 vs {sc.split()[-1]}",
            f"mean per held-out prompt with a pair in both of pooled Δlp_w(scenario 1) − Δlp_w({sc}) (nats); "
            f"{100 * level:.1f} % interval (Bonferroni over {m})",
            stats.bootstrap_ci(diffs[sc], np.mean, level=level, n_resamples=s.n_resamples, seed=s.seed),
            stats.Test(f"Wilcoxon signed-rank, Holm over {m}", p, t.n),
            +1,
            seeds,
        )
        for sc, t, p in zip(others, raw, adjusted)
    ]
    verdicts = [judge_claim(c.interval, c.test, c.direction, s) for c in rows]
    overall = (
        "reproduced"
        if all(v == "reproduced" for v in verdicts)
        else "contradicted"
        if "contradicted" in verdicts
        else "not significant"
    )
    weakest = min(rows, key=lambda c: c.interval.estimate if math.isfinite(c.interval.estimate) else -math.inf)
    whole = Claim(
        f"{dpo} (DPO): scenario 1 shows the mildest displacement (lp_w falls least there)",
        "claim 3",
        ", ".join(["1", *(sc.split()[-1] for sc in others)]),
        f"the smallest of the {m} differences above ({weakest.scenario}); reproduced only where scenario 1 is "
        "significantly higher than every other scenario, contradicted where another is significantly higher",
        weakest.interval,
        weakest.test,
        +1,
        seeds,
        overall,
    )
    return [*rows, whole]
