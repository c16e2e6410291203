"""Markdown building blocks of the generated pages: tables and figures read from JSON.

JSON has no NaN (the stages write missing figures as null) and a page must render whatever a file holds,
so every reader here takes a value that may be absent and prints ``n/a`` for it rather than failing.
Intervals and tests are printed by the same code the report uses (:mod:`pipeline.analysis.stats`,
:func:`pipeline.analysis.findings.verdict`), so a page reads exactly as the report does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.analysis.findings import StatSettings, verdict
from pipeline.analysis.stats import Interval, Test

NA = "n/a"


def number(x: Any) -> float:
    """``x`` as a float; NaN for anything that is not a number (null, text, a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    return float(x)


def ratio(a: Any, b: Any) -> float:
    """``a / b``; NaN when either is not a number or ``b`` is zero."""
    x, y = number(a), number(b)
    return x / y if math.isfinite(x) and math.isfinite(y) and y != 0 else math.nan


def fixed(x: Any, nd: int = 1, scale: float = 1.0, signed: bool = False) -> str:
    """``x`` with ``nd`` decimals (``n/a`` when it is not a number)."""
    v = number(x)
    if not math.isfinite(v):
        return NA
    return f"{scale * v:{'+' if signed else ''}.{nd}f}"


def count(x: Any) -> str:
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else NA


def interval(d: Any) -> Interval:
    """An :class:`Interval` from its JSON dict (estimate, low, high, level); NaN where absent."""
    d = d if isinstance(d, Mapping) else {}
    return Interval(*(number(d.get(k)) for k in ("estimate", "low", "high", "level")))


def test(d: Any) -> Test:
    """A :class:`Test` from its JSON dict (name, p_value, n)."""
    d = d if isinstance(d, Mapping) else {}
    n = d.get("n")
    return Test(str(d.get("name") or "test"), number(d.get("p_value")), n if isinstance(n, int) else 0)


def settings(d: Any) -> StatSettings | None:
    """The report's or the study's statistical settings from their JSON dict; None when incomplete."""
    if not isinstance(d, Mapping):
        return None
    try:
        return StatSettings(
            alpha=float(d["alpha"]),
            level=float(d["level"]),
            n_resamples=int(d["n_resamples"]),
            seed=int(d["seed"]),
            drastic_drop_orders=float(d["drastic_drop_orders"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def tested(d: Any, s: StatSettings | None) -> str:
    """A test as the report prints it: ``sign test, n = 82, p < 1e-4 < α = 0.05``."""
    t = test(d)
    if not isinstance(d, Mapping):
        return NA
    return verdict(t, s) if s is not None else t.fmt()


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table; a cell's ``|`` is escaped so that text from JSON cannot break the layout."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
