"""The data scenarios of the 3D-properties paper (Yan et al. 2024, arXiv 2406.07327) side by side, one column
per scenario's experiment: the report of the scenarios flow (:mod:`pipeline.flows.scenarios`)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.analysis.stats import fmt_number
from pipeline.data import tagging

# Per scenario, where the chosen / rejected responses come from, e.g. "gold/policy"
SCENARIO_LABELS = {k: f"{c}/{r}" for k, (c, r) in tagging.SCENARIO_SOURCES.items()}


def _pct(x: Any, nd: int = 0) -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) else f"{100 * x:.{nd}f}%"


# (row label, value of one scenario's {"pairs": ..., "eval": ...} as text)
_SCENARIO_ROWS: list[tuple[str, Any]] = [
    ("train pairs", lambda p, e: fmt_number(p.get("n_train"))),
    ("held-out pairs", lambda p, e: fmt_number(p.get("n_heldout"))),
    (
        "chosen: log-prob per token under the starting policy",
        lambda p, e: fmt_number((p.get("on_policy") or {}).get("chosen_policy_logprob_per_token"), 3),
    ),
    (
        "rejected: log-prob per token under the starting policy",
        lambda p, e: fmt_number((p.get("on_policy") or {}).get("rejected_policy_logprob_per_token"), 3),
    ),
    ("held-out chosen before (ref_w)", lambda p, e: fmt_number((e.get("heldout") or {}).get("ref_w"))),
    ("held-out chosen after (lp_w)", lambda p, e: fmt_number((e.get("heldout") or {}).get("lp_w"))),
    ("Δ chosen (lp_w − ref_w)", lambda p, e: fmt_number((e.get("heldout") or {}).get("delta_w"), signed=True)),
    ("held-out rejected before (ref_l)", lambda p, e: fmt_number((e.get("heldout") or {}).get("ref_l"))),
    ("held-out rejected after (lp_l)", lambda p, e: fmt_number((e.get("heldout") or {}).get("lp_l"))),
    ("Δ rejected (lp_l − ref_l)", lambda p, e: fmt_number((e.get("heldout") or {}).get("delta_l"), signed=True)),
    ("held-out pairs with lp_w < ref_w", lambda p, e: _pct((e.get("heldout") or {}).get("displaced_share"))),
    (
        "held-out pair accuracy (lp_w − lp_l > ref_w − ref_l)",
        lambda p, e: _pct((e.get("heldout") or {}).get("pair_accuracy")),
    ),
    ("test accuracy before (starting policy)", lambda p, e: _pct(e.get("test_accuracy_before"), 1)),
    ("test accuracy after", lambda p, e: _pct(e.get("test_accuracy"), 1)),
    ("mean normalised edit distance chosen↔rejected", lambda p, e: fmt_number(p.get("mean_edit_distance_norm"), 3)),
]


def scenario_table(rows: list[dict], variant: str) -> str:
    """The data scenarios of Yan et al. 2024 (arXiv 2406.07327) side by side for one train variant (cf. its
    Tables 1 and 2): one column per scenario, one row per quantity. Each row of ``rows`` is one experiment:
    ``{"scenario": k, "status": "done" | "failed", "experiment": name, "pairs": <metrics/pairs.json>, "eval":
    <metrics/eval/<variant>.json>}``. A missing value reads n/a, a failed experiment's column failed."""
    rows = sorted(rows, key=lambda r: r["scenario"])
    header = [f"{r['scenario']}: {SCENARIO_LABELS.get(r['scenario'], '?')}" for r in rows]
    lines = [
        f"# Data scenarios side by side (`{variant}`)",
        "",
        "Each column is one DVC experiment that rebuilt the pairs with `pairs.scenario` = k (the header names "
        "where the chosen / rejected responses come from: the policy's samples, the dataset's gold solution or "
        f"another model) and trained and evaluated `{variant}` on them; everything else is the same. "
        "The log-probs under the starting policy say how on-policy each side is; *before* is the reference "
        "model and *after* the trained one (summed over the response's tokens, mean over held-out pairs). "
        "Claim 3 of docs/losses.md: scenario 1 (both sides sampled from the policy) shows the mildest "
        "3D-properties: lp_w falls least there, i.e. its Δ chosen is the highest.",
        "",
    ]
    done = [
        r
        for r in rows
        if r.get("status") == "done"
        and isinstance(((r.get("eval") or {}).get("heldout") or {}).get("delta_w"), (int, float))
    ]
    if len(done) >= 2:
        best = max(done, key=lambda r: r["eval"]["heldout"]["delta_w"])
        lines += [
            f"In this run lp_w falls least in scenario {best['scenario']} "
            f"(Δ chosen {best['eval']['heldout']['delta_w']:+.2f})"
            + (
                ", as claimed."
                if best["scenario"] == 1
                else (
                    ", not in scenario 1."
                    if any(r["scenario"] == 1 for r in done)
                    else " (scenario 1 is not among the finished ones)."
                )
            ),
            "",
        ]
    if not rows:
        return "\n".join(lines + ["(no scenarios)", ""])
    lines += ["| | " + " | ".join(header) + " |", "|---|" + "---|" * len(rows)]
    lines.append(
        "| experiment | "
        + " | ".join(f"`{r.get('experiment')}`" if r.get("experiment") else "n/a" for r in rows)
        + " |"
    )
    lines.append("| status | " + " | ".join("done" if r.get("status") == "done" else "**failed**" for r in rows) + " |")
    for label, value in _SCENARIO_ROWS:
        cells = [
            value(r.get("pairs") or {}, r.get("eval") or {}) if r.get("status") == "done" else "failed" for r in rows
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
