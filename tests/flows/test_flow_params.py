"""The ``flows:`` settings (pipeline.flows.settings.FlowParams) as the flows read them: per-stage retries and
timeouts, the scenarios block, and errors that name the key. Every value comes from params.yaml."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from pipeline.flows.settings import FlowParamsError, load_flow_params, parse_flow_params


def test_stage_settings_from_params_yaml(shell_params, flows_section):
    # settings from params.yaml; a foreach group covers its members, a stage entry wins over it
    fp = load_flow_params(shell_params)
    assert fp.for_stage("flaky").retries == 1 and fp.for_stage("first").retries == 0
    fp = parse_flow_params(
        flows_section({"stages": {"train": {"retries": 2, "timeout_s": 9}, "train@dpo": {"timeout_s": 5}}})
    )
    assert (fp.for_stage("train@dpo").retries, fp.for_stage("train@dpo").timeout_s) == (2, 5)
    assert fp.for_stage("train@dpop").timeout_s == 9 and fp.resource_of("train@dpo") == "gpu"
    with pytest.raises(ValueError, match=r"flows\.stages\.x\.retries"):
        parse_flow_params(flows_section({"stages": {"x": {"retries": -1}}}))
    with pytest.raises(ValueError, match=r"flows\.typo"):
        parse_flow_params(flows_section({"typo": 1}))


SCENARIOS_PARAMS_BLOCK = textwrap.dedent("""\
    scenarios:               # `python -m pipeline.flows scenarios`: one experiment per pairs.scenario
      list: [1, 2, 3, 4]
      variant: dpo           # the loss compared across scenarios
      max_parallel: 1
      report: reports/scenarios_side_by_side.md
      timeout_s: 0
      retries: 0
    """)


def test_scenarios_settings(flows_section):
    # params.yaml's block, as the README describes it
    sc = parse_flow_params(flows_section(yaml.safe_load(SCENARIOS_PARAMS_BLOCK))).scenarios
    assert sc == parse_flow_params(flows_section()).scenarios
    assert (sc.list, sc.variant, sc.max_parallel, sc.report, sc.timeout_s, sc.retries) == (
        [1, 2, 3, 4],
        "dpo",
        1,
        "reports/scenarios_side_by_side.md",
        0,
        0,
    )
    changed = flows_section({"scenarios": {"list": [3, 1], "variant": "dpop"}})
    assert parse_flow_params(changed).scenarios.list == [3, 1]
    for bad, msg in (
        ({"list": []}, r": List should have at least 1 item"),
        ({"list": [1, 5]}, r"\.1: Input should be 1, 2, 3 or 4 \(got 5\)"),
        ({"list": [2, 2]}, r": 2 listed more than once"),
        ({"list": "1"}, r": .*valid list"),
    ):
        with pytest.raises(FlowParamsError, match=rf"flows\.scenarios\.list{msg}"):
            parse_flow_params(flows_section({"scenarios": bad}))
    with pytest.raises(FlowParamsError, match=r"flows\.scenarios\.max_parallel"):
        parse_flow_params(flows_section({"scenarios": {"max_parallel": 0}}))
    with pytest.raises(FlowParamsError, match=r"flows\.scenarios\.typo"):
        parse_flow_params(flows_section({"scenarios": {"typo": 1}}))
