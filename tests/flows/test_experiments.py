"""pipeline/flows/experiments.py: param overrides in the ``dvc exp run -S`` grammar, written by DVC's
own code; flattening and selecting metrics; grid points."""

from __future__ import annotations

import yaml

from pipeline.flows import experiments


def test_overrides_written_by_dvc_keep_comments(shell_params):
    # overrides in the `dvc exp run -S` grammar, written by DVC's own code (comments kept)
    assert experiments.override_args({"a.x": 0.5, "p": "it's", "l": [1, "b"], "t": True}) == [
        "a.x=0.5", "p='it\\'s'", "l=[1, 'b']", "t=true"]
    experiments.apply_overrides(shell_params, {"a.x": 5, "b.y": "/some/path with space"})
    text = (shell_params / "params.yaml").read_text()
    assert text.startswith("# shell pipeline") and yaml.safe_load(text)["b"]["y"] == "/some/path with space"
    assert yaml.safe_load(text)["a"]["x"] == 5


def test_flatten_select_and_grid():
    assert experiments.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    metrics = {"metrics/eval/dpo.json:test_accuracy": 0.5, "metrics/eval/dpo.json:variant": "dpo",
               "metrics/pairs.json:n_train": 8, "metrics/pairs.json:ok": True}
    assert experiments.select_metrics(metrics, ["metrics/eval/*.json:test_*"]) == {
        "metrics/eval/dpo.json:test_accuracy": 0.5}
    assert experiments.select_metrics(metrics, []) == {"metrics/eval/dpo.json:test_accuracy": 0.5,
                                                       "metrics/pairs.json:n_train": 8}
    assert experiments.grid_points({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
