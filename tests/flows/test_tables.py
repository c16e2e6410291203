"""pipeline/flows/tables.py: metric names and markdown tables."""

from __future__ import annotations

from pipeline.flows import tables


def test_short_metric_and_markdown_table():
    assert tables.short_metric("metrics/eval/dpo.json:heldout.delta_w") == "eval/dpo:heldout.delta_w"
    assert tables.markdown_table([]) == "(no rows)\n"
    md = tables.markdown_table([{"a": 0.123456, "b": "x|y"}, {"a": None, "c": 3}])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| 0.1235 | x\\|y |  |", "|  |  | 3 |"]
    assert tables.markdown_table([{"a": 1, "b": 2}], ["b"]).splitlines()[2] == "| 2 |"
