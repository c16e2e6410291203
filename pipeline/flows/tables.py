"""Metric tables: ``dvc metrics show`` as rows, short metric names, and markdown tables for the
flows' reports and logs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.flows.dvc_process import dvc_output
from pipeline.flows.experiments import flatten


def metrics_rows(repo: str | os.PathLike) -> list[dict[str, Any]]:
    """``dvc metrics show --json`` as rows {file, metric, value} (numbers and strings only)."""
    data = json.loads(dvc_output(["metrics", "show", "--json"], repo) or "{}")
    rows = []
    for content in data.values():
        for file, m in ((content or {}).get("data") or {}).items():
            for k, v in flatten((m or {}).get("data") or {}).items():
                if isinstance(v, (int, float, str)):
                    rows.append({"file": file, "metric": k, "value": v})
    return rows


def short_metric(name: str) -> str:
    """``metrics/eval/dpo.json:heldout.delta_w`` -> ``eval/dpo:heldout.delta_w``."""
    file, _, key = name.partition(":")
    file = re.sub(r"^metrics/", "", re.sub(r"\.json$", "", file))
    return f"{file}:{key}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as a markdown table; columns default to every key, in order of first appearance."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
