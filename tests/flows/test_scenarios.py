"""pipeline/flows/scenarios.py: the report's rows from ``dvc exp show``, and (slow) scenarios_flow over a
shell pipeline."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from repo_utils import commit_git_dvc_repo


def test_scenario_rows():
    from pipeline.flows.scenarios import scenario_rows

    # the report's rows from `dvc exp show` (experiments.experiments): each scenario's metrics files
    exps = [
        {
            "name": "c-s1",
            "metrics": {},
            "metric_files": {
                "metrics/pairs.json": {"scenario": 1, "n_train": 8},
                "metrics/eval/dpo.json": {"test_accuracy": 0.5},
                "metrics/eval/dpop.json": {"test_accuracy": 0.1},
            },
        },
        {"name": "other", "metric_files": {"metrics/pairs.json": {"n_train": 99}}},
    ]
    rows = scenario_rows(exps, {1: "c-s1", 3: "c-s3"}, ["c-s3"], "dpo")
    assert rows == [
        {
            "scenario": 1,
            "status": "done",
            "experiment": "c-s1",
            "pairs": {"scenario": 1, "n_train": 8},
            "eval": {"test_accuracy": 0.5},
        },
        {"scenario": 3, "status": "failed", "experiment": "c-s3", "pairs": {}, "eval": {}},
    ]


SCENARIOS_DVC_YAML = textwrap.dedent("""\
    stages:
      pairs:
        cmd: >-
          mkdir -p metrics && if [ ${pairs.scenario} = 3 ]; then echo "no pairs in scenario 3"; exit 1; fi &&
          if [ ${pairs.source} != judged ]; then echo "scenarios need judged pairs"; exit 1; fi &&
          echo '{"scenario": ${pairs.scenario}, "n_train": 1${pairs.scenario}, "n_heldout": 2,
          "mean_edit_distance_norm": 0.5, "on_policy": {"chosen_policy_logprob_per_token": -0.${pairs.scenario},
          "rejected_policy_logprob_per_token": -1.5}}' > metrics/pairs.json
        params: [pairs.scenario, pairs.source]
        metrics:
          - metrics/pairs.json:
              cache: false
      evaluate:
        foreach: [dpo, dpop]
        do:
          cmd: >-
            mkdir -p metrics/eval && echo '{"variant": "${item}", "test_accuracy_before": 0.25,
            "test_accuracy": 0.5, "heldout": {"n_pairs": 2, "ref_w": -10.0, "lp_w": -1${pairs.scenario}.0,
            "delta_w": -${pairs.scenario}.0, "ref_l": -20.0, "lp_l": -30.0, "delta_l": -10.0,
            "displaced_share": 0.5, "pair_accuracy": 1.0}}' > metrics/eval/${item}.json
          deps: [metrics/pairs.json]
          params: [pairs.scenario]
          metrics:
            - metrics/eval/${item}.json:
                cache: false
    """)


@pytest.mark.slow
def test_scenarios_flow_on_shell_pipeline(tmp_path_factory, prefect_harness, flows_section, exp_names, latest_artifact):
    """scenarios_flow over a shell pipeline whose `pairs` fails in scenario 3: one experiment per
    scenario, the report with one column each (the failed one says so), the flow failing at the end."""
    from pipeline.flows.scenarios import scenarios_flow

    repo = tmp_path_factory.mktemp("scenarioflows") / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(SCENARIOS_DVC_YAML)
    # the default's pairs are constructed: each scenario experiment must switch to judged pairs
    params = {
        "pairs": {"scenario": 1, "source": "constructed"},
        "flows": flows_section(
            {"log_tail_lines": 5, "scenarios": {"list": [1, 2], "max_parallel": 2, "report": "out/s.md"}}
        ),
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_git_dvc_repo(repo)
    with pytest.raises(RuntimeError, match=r"1 of 3 experiments failed: cmp-s3"):
        scenarios_flow(scenarios=[1, 3, 4], name="cmp", repo=str(repo))
    assert {"cmp-s1", "cmp-s4"} <= exp_names(repo) and "cmp-s3" not in exp_names(repo)
    md = (repo / "out" / "s.md").read_text()
    assert "| | 1: policy/policy | 3: policy/other | 4: gold/other |" in md
    assert "| status | done | **failed** | done |" in md
    assert "| train pairs | 11 | failed | 14 |" in md
    assert "| chosen: log-prob per token under the starting policy | -0.100 | failed | -0.400 |" in md
    assert "| Δ chosen (lp_w − ref_w) | -1.00 | failed | -4.00 |" in md
    assert "lp_w falls least in scenario 1" in md
    assert latest_artifact("dpo-scenarios").data == md
    assert (repo / "params.yaml").read_text() == yaml.safe_dump(params, sort_keys=False)
