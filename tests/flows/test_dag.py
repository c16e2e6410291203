"""pipeline/flows/dag.py: the stage order of ``dvc dag``, targets with their upstream, CPU / GPU segments."""

from __future__ import annotations

import pytest

from pipeline.flows import dag
from pipeline.flows.settings import parse_flow_params


def test_stage_order_and_targets(shell_repo):
    # dvc dag order, foreach stages expanded; targets bring their upstream
    assert dag.stage_order(shell_repo) == ["first", "second@p", "second@q", "flaky"]
    assert dag.stage_order(shell_repo, ["second"]) == ["first", "second@p", "second@q"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        dag.stage_order(shell_repo, ["nope"])


def test_topo_order_keeps_dvc_order_and_finds_cycles():
    nodes = ["b", "a", "c"]
    assert dag.topo_order(nodes, {"c": {"a"}, "b": {"c"}}) == ["a", "c", "b"]
    assert dag.topo_order(nodes, {}) == nodes
    with pytest.raises(ValueError, match="cycle"):
        dag.topo_order(nodes, {"a": {"b"}, "b": {"a"}})
    assert dag.expand_targets(["train", "prepare"], ["prepare", "train@dpo", "train@dpop"]) == [
        "train@dpo",
        "train@dpop",
        "prepare",
    ]
    assert dag.with_ancestors(["c"], {"c": {"b"}, "b": {"a"}}) == {"a", "b", "c"}


def test_segments_of_the_real_pipeline(flows_section):
    # the CPU / GPU split of the real pipeline (flows.resources of params.yaml)
    real = ["prepare", "policy", "sample", "judge", "pairs", "reference", "train@dpo", "evaluate@dpo", "report"]
    assert dag.segments(real, parse_flow_params(flows_section()).resource_of) == [
        ("cpu", ["prepare"]),
        ("gpu", ["policy", "sample"]),
        ("cpu", ["judge", "pairs"]),
        ("gpu", ["reference", "train@dpo", "evaluate@dpo"]),
        ("cpu", ["report"]),
    ]
