"""The tables of a study's ``summary.json`` (:func:`pipeline.analysis.study_report.study_report`) on the generated
results page: its claims, its variants and its seeds, shared by the sections of the multi-seed study, the scenario
study and the tuned comparison (:mod:`pipeline.pages.results`, :mod:`pipeline.pages.studies`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.analysis.findings import StatSettings
from pipeline.pages.markdown import NA, count, fixed, interval, table, tested


def load(path: Path) -> dict | None:
    """The JSON object in ``path``; None where the file is absent (its section says it has not run)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def rule(s: StatSettings | None) -> str:
    """The intervals and α a file's figures were computed with."""
    if s is None:
        return "The file records no statistical settings."
    return (
        f"{100 * s.level:.0f} % intervals (paired bootstrap over pairs or prompts, {s.n_resamples} resamples, "
        f"seed {s.seed}; Wilson for accuracies), α = {s.alpha:g}."
    )


def _spread(x: Any, nd: int = 2, scale: float = 1.0, signed: bool = True) -> str:
    """``mean ± sd`` across seeds."""
    x = x if isinstance(x, Mapping) else {}
    mean, sd = fixed(x.get("mean"), nd, scale, signed), fixed(x.get("sd"), nd, scale)
    return mean if sd == NA else f"{mean} ± {sd}"


def claims_table(summary: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for c in summary.get("claims") or []:
        iv = interval({"estimate": c.get("estimate"), "low": c.get("low"), "high": c.get("high")})
        test = {"name": c.get("test"), "p_value": c.get("p_value"), "n": c.get("n")}
        rows.append(
            [
                str(c.get("claim", NA)),
                f"[{c.get('source', NA)}](losses.md#claims)",
                str(c.get("scenario", NA)),
                str(c.get("measure", NA)),
                iv.fmt(),
                tested(test, s),
                str(c.get("seeds", NA)),
                f"**{c.get('verdict', NA)}**",
            ]
        )
    return table(
        ["claim", "source", "pairs", "measure", "estimate and interval", "test", "seeds agreeing", "verdict"], rows
    )


def study_variants_table(summary: Mapping, s: StatSettings | None) -> list[str]:
    rows = []
    for r in summary.get("summary") or []:
        rows.append(
            [
                str(r.get("scenario", NA)),
                f"`{r.get('variant', NA)}`",
                ", ".join(map(str, r.get("seeds") or [])),
                count(r.get("pairs")),
                _spread(r.get("delta_w_seeds")),
                interval(r.get("delta_w")).fmt(),
                f"{interval(r.get('below')).fmt_share()}, {tested(r.get('below_test'), s)}",
                _spread(r.get("delta_l_seeds")),
                interval(r.get("delta_l")).fmt(),
                fixed(r.get("accuracy_before"), 1, 100),
                _spread(r.get("accuracy_seeds"), 1, 100, signed=False),
                f"{interval(r.get('accuracy_change')).fmt(1, 100)}, {tested(r.get('accuracy_test'), s)}",
            ]
        )
    return table(
        [
            "pairs",
            "variant",
            "seeds",
            "held-out pairs",
            "Δlp_w across seeds",
            "Δlp_w pooled",
            "below ref (sign test)",
            "Δlp_l across seeds",
            "Δlp_l pooled",
            "accuracy before (%)",
            "accuracy across seeds (%)",
            "accuracy change pooled (pts)",
        ],
        rows,
    )


def per_seed_table(summary: Mapping) -> list[str]:
    rows = [
        [
            str(r.get("scenario", NA)),
            f"`{r.get('variant', NA)}`",
            count(r.get("seed")),
            f"`{r.get('experiment', NA)}`",
            count(r.get("pairs")),
            fixed(r.get("delta_w"), 2, signed=True),
            fixed(r.get("delta_l"), 2, signed=True),
            fixed(r.get("accuracy"), 1, 100),
        ]
        for r in summary.get("per_seed") or []
    ]
    return table(
        ["pairs", "variant", "seed", "experiment", "held-out pairs", "mean Δlp_w", "mean Δlp_l", "accuracy (%)"], rows
    )
