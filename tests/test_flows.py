"""Prefect flows over the DVC stages (pipeline/flows.py), under one `prefect_test_harness` per session.

Cheap checks (order, settings, retries, failures, timeouts, overrides recorded as experiments) run on
a throwaway dvc.yaml of shell commands; the real pipeline on the tiny config runs once in the default
suite (end to end, then a second run that reruns nothing); the param-change, sweep and rounds runs of
the real pipeline (and a sweep of the shell pipeline) are marked slow."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from repo_utils import make_repo, ran, run, tiny_params

ALL = {"prepare", "policy", "sample", "sample_other", "judge", "pairs", "reference", "train@dpo", "train@dpop",
       "evaluate@dpo", "evaluate@dpop", "report", "toy"}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server + database for the whole session (start-up takes 10-15 s)."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _latest(key: str):
    return max(_artifacts(key), key=lambda a: a.created)


def _task_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


def _exp_names(repo: Path) -> set[str]:
    from pipeline.flows.dvc_runner import experiments

    return {e["name"] for e in experiments(repo)}


SHELL_DVC_YAML = textwrap.dedent("""\
    stages:
      first:
        cmd: echo "first ${a.x}" > first.txt && echo "first says hello"
        params: [a.x]
        outs: [first.txt]
      second:
        foreach: [p, q]
        do:
          cmd: >-
            cat first.txt > second_${item}.txt && echo "${b.y}" >> second_${item}.txt &&
            echo '{"y": ${b.y}}' > m_${item}.json
          deps: [first.txt]
          params: [b.y]
          outs:
            - second_${item}.txt
          metrics:
            - m_${item}.json:
                cache: false
      flaky:
        cmd: >-
          if [ ! -f ${marker} ]; then touch ${marker}; echo "flaky: the first try fails"; exit 1; fi;
          cat second_p.txt second_q.txt > flaky.txt
        deps: [second_p.txt, second_q.txt]
        outs: [flaky.txt]
    """)


@pytest.fixture(scope="module")
def shell_repo(tmp_path_factory) -> Path:
    """A git + DVC repo whose stages are shell commands; `flaky` fails on its first try only."""
    root = tmp_path_factory.mktemp("shellflows")
    repo = root / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(SHELL_DVC_YAML)
    params = {"a": {"x": 1}, "b": {"y": 2}, "marker": str(root / "flaky.marker"),
              "flows": {"defaults": {"retries": 0, "retry_delay_s": 0},
                        "stages": {"flaky": {"retries": 1}, "bad": {"timeout_s": 60}},
                        "log_tail_lines": 5,
                        "sweep": {"metrics": ["m_*.json:y"]}}}
    # a comment the override round-trip must keep
    (repo / "params.yaml").write_text("# shell pipeline\n" + yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo)
    return repo


# ------------------------------------------------------------------------------------------ cheap
def test_order_settings_overrides_and_job_template(shell_repo):
    from pipeline.flows import dvc_runner
    from pipeline.flows import FlowParams, kubernetes_job_template, load_flow_params

    # dvc dag order, foreach stages expanded; targets bring their upstream
    assert dvc_runner.stage_order(shell_repo) == ["first", "second@p", "second@q", "flaky"]
    assert dvc_runner.stage_order(shell_repo, ["second"]) == ["first", "second@p", "second@q"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        dvc_runner.stage_order(shell_repo, ["nope"])

    # settings from params.yaml; a foreach group covers its members, a stage entry wins over it
    fp = load_flow_params(shell_repo)
    assert fp.for_stage("flaky").retries == 1 and fp.for_stage("first").retries == 0
    fp = FlowParams(stages={"train": {"retries": 2, "timeout_s": 9}, "train@dpo": {"timeout_s": 5}})
    assert (fp.for_stage("train@dpo").retries, fp.for_stage("train@dpo").timeout_s) == (2, 5)
    assert fp.for_stage("train@dpop").timeout_s == 9 and fp.resource_of("train@dpo") == "gpu"
    with pytest.raises(ValueError, match=r"flows\.stages\.x\.retries"):
        dvc_runner.parse_flow_params({"stages": {"x": {"retries": -1}}})
    with pytest.raises(ValueError, match=r"flows\.typo"):
        dvc_runner.parse_flow_params({"typo": 1})

    # overrides in the `dvc exp run -S` grammar, written by DVC's own code (comments kept)
    assert dvc_runner.override_args({"a.x": 0.5, "p": "it's", "l": [1, "b"], "t": True}) == [
        "a.x=0.5", "p='it\\'s'", "l=[1, 'b']", "t=true"]
    work = shell_repo.parent / "override_check"
    work.mkdir(exist_ok=True)
    (work / "params.yaml").write_text((shell_repo / "params.yaml").read_text())
    dvc_runner.apply_overrides(work, {"a.x": 5, "b.y": "/some/path with space"})
    text = (work / "params.yaml").read_text()
    assert text.startswith("# shell pipeline") and yaml.safe_load(text)["b"]["y"] == "/some/path with space"

    # the CPU / GPU split of the real pipeline
    real = ["prepare", "policy", "sample", "judge", "pairs", "reference", "train@dpo", "evaluate@dpo", "report"]
    assert dvc_runner.segments(real, FlowParams().resource_of) == [
        ("cpu", ["prepare"]), ("gpu", ["policy", "sample"]), ("cpu", ["judge", "pairs"]),
        ("gpu", ["reference", "train@dpo", "evaluate@dpo"]), ("cpu", ["report"])]

    tpl = kubernetes_job_template(gpus=2)
    container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert tpl["variables"]["properties"]["gpu_count"]["default"] == 2

    # prefect.yaml parses and points at flows that exist
    import pipeline.flows as flows

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert path == "pipeline/flows.py" and hasattr(flows, func), dep["name"]


def test_flow_retries_overrides_and_failures(shell_repo, prefect_harness):
    from pipeline.flows.dvc_runner import experiments
    from pipeline.flows import StageFailed, pipeline_flow

    # first run: every stage runs; `flaky` fails once and its retry succeeds
    res = pipeline_flow(repo=str(shell_repo))
    assert res["order"] == ["first", "second@p", "second@q", "flaky"]
    assert set(res["ran"]) == {"first", "second@p", "second@q", "flaky"} and res["experiment"] is None
    assert (shell_repo / "flaky.txt").is_file()
    [flaky_run] = _task_runs("flaky")
    assert flaky_run.run_count == 2 and flaky_run.state.is_completed()
    assert _artifacts("dpo-metrics") and _artifacts("dpo-stages")

    # an override reruns only what depends on it, is recorded as a DVC experiment, and params.yaml
    # comes back as it was (comments included)
    before = (shell_repo / "params.yaml").read_text()
    res = pipeline_flow(overrides={"b.y": 7}, experiment="y-seven", repo=str(shell_repo))
    assert set(res["ran"]) == {"second@p", "second@q", "flaky"} and res["experiment"] == "y-seven"
    assert (shell_repo / "params.yaml").read_text() == before
    exps = {e["name"]: e for e in experiments(shell_repo)}
    assert exps["y-seven"]["params"]["b.y"] == 7 and exps["y-seven"]["metrics"]["m_p.json:y"] == 7

    # a stage that always fails ends the flow with its name and its last log lines; what ran before
    # stays cached and up to date
    with (shell_repo / "dvc.yaml").open("a") as f:
        f.write("  bad:\n    cmd: echo 'bad is about to fail' && exit 3\n    deps: [flaky.txt]\n    outs: [bad.txt]\n")
    with pytest.raises(StageFailed, match=r"DVC stage 'bad' failed \(its command exited with 3\)") as err:
        pipeline_flow(repo=str(shell_repo))
    assert "bad is about to fail" in str(err.value)
    status = run(["dvc", "status", "first", "second@p", "second@q", "flaky"], shell_repo)
    assert "up to date" in status, status

    # a stage past its timeout is killed and named
    params = yaml.safe_load((shell_repo / "params.yaml").read_text())
    params["flows"]["stages"]["bad"] = {"timeout_s": 1}
    (shell_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    text = (shell_repo / "dvc.yaml").read_text().replace("echo 'bad is about to fail' && exit 3",
                                                        "echo 'bad is sleeping' && sleep 60")
    (shell_repo / "dvc.yaml").write_text(text)
    with pytest.raises(StageFailed, match=r"'bad' failed \(timed out after 1 s\)"):
        pipeline_flow(targets=["bad"], repo=str(shell_repo))


@pytest.mark.slow
def test_sweep_flow_on_shell_pipeline(shell_repo, prefect_harness):
    from pipeline.flows import sweep_flow

    run(["git", "add", "-A"], shell_repo)  # the sweep's temporary copies start from HEAD
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "sweep base"], shell_repo)
    res = sweep_flow(grid={"a.x": [1, 2], "b.y": [3, 4]}, max_parallel=2, targets=["second"], name="grid",
                     repo=str(shell_repo))
    assert res["experiments"] == ["grid-1", "grid-2", "grid-3", "grid-4"]
    assert {(r["a.x"], r["b.y"], r["m_p:y"]) for r in res["table"]} == {(1, 3, 3), (1, 4, 4), (2, 3, 3), (2, 4, 4)}
    assert {"grid-1", "grid-2", "grid-3", "grid-4"} <= _exp_names(shell_repo)
    [art] = _artifacts("sweep-grid")
    assert art.type == "table"


SCENARIOS_PARAMS_BLOCK = textwrap.dedent("""\
    scenarios:               # `python -m pipeline.flows scenarios`: one experiment per pairs.scenario
      list: [1, 2, 3, 4]
      variant: dpo           # the loss compared across scenarios
      max_parallel: 1
      report: reports/scenarios.md
      timeout_s: 0
      retries: 0
    """)


def test_scenarios_settings_rows_and_cli(tmp_path, monkeypatch, capsys):
    from pipeline import flows
    from pipeline.flows import dvc_runner

    # the defaults are the params.yaml block
    sc = dvc_runner.parse_flow_params(yaml.safe_load(SCENARIOS_PARAMS_BLOCK)).scenarios
    assert sc == dvc_runner.FlowParams().scenarios
    assert (sc.list, sc.variant, sc.max_parallel, sc.report, sc.timeout_s, sc.retries) == (
        [1, 2, 3, 4], "dpo", 1, "reports/scenarios.md", 0, 0)
    assert dvc_runner.parse_flow_params({"scenarios": {"list": [3, 1], "variant": "dpop"}}).scenarios.list == [3, 1]
    for bad, msg in (({"list": []}, "at least one scenario"), ({"list": [1, 5]}, r"unknown scenario\(s\) \[5\]"),
                     ({"list": [2, 2]}, r"\[2\] listed more than once"), ({"list": "1"}, "valid list")):
        with pytest.raises(dvc_runner.FlowParamsError, match=rf"flows\.scenarios\.list: .*{msg}"):
            dvc_runner.parse_flow_params({"scenarios": bad})
    with pytest.raises(dvc_runner.FlowParamsError, match=r"flows\.scenarios\.max_parallel"):
        dvc_runner.parse_flow_params({"scenarios": {"max_parallel": 0}})
    with pytest.raises(dvc_runner.FlowParamsError, match=r"flows\.scenarios\.typo"):
        dvc_runner.parse_flow_params({"scenarios": {"typo": 1}})

    # the report's rows from `dvc exp show` (dvc_runner.experiments): each scenario's metrics files
    exps = [{"name": "c-s1", "metrics": {}, "metric_files": {
                "metrics/pairs.json": {"scenario": 1, "n_train": 8}, "metrics/eval/dpo.json": {"test_accuracy": 0.5},
                "metrics/eval/dpop.json": {"test_accuracy": 0.1}}},
            {"name": "other", "metric_files": {"metrics/pairs.json": {"n_train": 99}}}]
    rows = flows._scenario_rows(exps, {1: "c-s1", 3: "c-s3"}, ["c-s3"], "dpo")
    assert rows == [{"scenario": 1, "status": "done", "experiment": "c-s1", "pairs": {"scenario": 1, "n_train": 8},
                     "eval": {"test_accuracy": 0.5}},
                    {"scenario": 3, "status": "failed", "experiment": "c-s3", "pairs": {}, "eval": {}}]

    # the CLI: python -m pipeline.flows scenarios [--variant V] [--list K ...] [-n NAME]
    calls = []
    monkeypatch.setattr(flows, "scenarios_flow", lambda **kw: calls.append(kw) or {"markdown": "| table |"})
    flows.main(["--repo", str(tmp_path), "scenarios", "--variant", "dpop", "--list", "1", "3", "-n", "cmp"])
    flows.main(["scenarios"])
    assert calls == [{"scenarios": [1, 3], "variant": "dpop", "name": "cmp", "repo": str(tmp_path)},
                     {"scenarios": None, "variant": None, "name": None, "repo": "."}]
    assert "| table |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        flows.main(["scenarios", "--list", "5"])


SCENARIOS_DVC_YAML = textwrap.dedent("""\
    stages:
      pairs:
        cmd: >-
          mkdir -p metrics && if [ ${pairs.scenario} = 3 ]; then echo "no pairs in scenario 3"; exit 1; fi &&
          echo '{"scenario": ${pairs.scenario}, "n_train": 1${pairs.scenario}, "n_heldout": 2,
          "mean_edit_distance_norm": 0.5, "on_policy": {"chosen_policy_logprob_per_token": -0.${pairs.scenario},
          "rejected_policy_logprob_per_token": -1.5}}' > metrics/pairs.json
        params: [pairs.scenario]
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
def test_scenarios_flow_on_shell_pipeline(tmp_path_factory, prefect_harness):
    """scenarios_flow over a shell pipeline whose `pairs` fails in scenario 3: one experiment per
    scenario, the report with one column each (the failed one says so), the flow failing at the end."""
    from pipeline.flows import scenarios_flow

    repo = tmp_path_factory.mktemp("scenarioflows") / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(SCENARIOS_DVC_YAML)
    params = {"pairs": {"scenario": 1},
              "flows": {"log_tail_lines": 5, "scenarios": {"list": [1, 2], "max_parallel": 2, "report": "out/s.md"}}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo)
    with pytest.raises(RuntimeError, match=r"1 of 3 experiments failed: cmp-s3"):
        scenarios_flow(scenarios=[1, 3, 4], name="cmp", repo=str(repo))
    assert {"cmp-s1", "cmp-s4"} <= _exp_names(repo) and "cmp-s3" not in _exp_names(repo)
    md = (repo / "out" / "s.md").read_text()
    assert "| | 1: policy/policy | 3: policy/other | 4: gold/other |" in md
    assert "| status | done | **failed** | done |" in md
    assert "| train pairs | 11 | failed | 14 |" in md
    assert "| chosen: log-prob per token under the starting policy | -0.100 | failed | -0.400 |" in md
    assert "| Δ chosen (lp_w − ref_w) | -1.00 | failed | -4.00 |" in md
    assert "lp_w falls least in scenario 1" in md
    assert _latest("dpo-scenarios").data == md
    assert (repo / "params.yaml").read_text() == yaml.safe_dump(params, sort_keys=False)


# ------------------------------------------------------------------------------------------ real pipeline
@pytest.fixture(scope="module")
def flowed_repo(tmp_path_factory, tiny_model_dir, prefect_harness):
    """The tiny config in a temporary git repo, after one pipeline flow run."""
    from pipeline.flows import pipeline_flow

    repo = make_repo(tmp_path_factory.mktemp("flows"), tiny_params(tiny_model_dir))
    return repo, pipeline_flow(repo=str(repo))


@pytest.mark.slow  # the real pipeline once more (test_e2e runs it with `dvc repro` in the default suite)
def test_pipeline_flow_end_to_end_then_nothing(flowed_repo):
    repo, first = flowed_repo
    assert set(first["ran"]) == ALL and set(first["order"]) == ALL
    order = first["order"]
    assert order.index("prepare") < order.index("policy") < order.index("sample") < order.index("judge") \
        < order.index("pairs") < order.index("reference") < order.index("train@dpo") < order.index("evaluate@dpo") \
        < order.index("report")
    # the same outputs `dvc repro` makes: DVC finds every stage up to date
    assert ran(run(["dvc", "repro"], repo)) == set()
    for rel in ("data/prompts.parquet", "data/candidates.parquet", "data/pairs.parquet", "data/reference.parquet",
                "models/dpo/config.json", "models/dpop/config.json", "metrics/eval/dpo.json",
                "reports/main/report.md", "data/toy/history.parquet"):
        assert (repo / rel).is_file(), rel
    assert "| dpo |" in _latest("dpo-report").data
    assert any(r["file"] == "metrics/eval/dpo.json" for r in json.loads(_latest("dpo-metrics").data))
    assert [r for r in _task_runs("train@dpo")] and _task_runs("evaluate@dpop")

    from pipeline.flows import pipeline_flow

    second = pipeline_flow(repo=str(repo))
    assert second["ran"] == [] and set(second["stages"].values()) == {"skipped"}


@pytest.mark.slow
def test_pipeline_flow_param_change_is_an_experiment(flowed_repo):
    from pipeline.flows import pipeline_flow

    repo, _ = flowed_repo
    before = (repo / "params.yaml").read_text()
    res = pipeline_flow(overrides={"train.variants.dpo.beta": 0.3}, repo=str(repo))
    assert set(res["ran"]) == {"train@dpo", "evaluate@dpo", "report"}
    assert res["experiment"] and res["experiment"] in _exp_names(repo)
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    assert res["experiment"] in show and "0.3" in show
    assert (repo / "params.yaml").read_text() == before


@pytest.mark.slow
def test_sweep_flow_tiny_2x2(flowed_repo):
    from pipeline.flows import sweep_flow

    repo, _ = flowed_repo
    res = sweep_flow(grid={"train.variants.dpo.beta": [0.2, 0.4], "train.lr": [1e-4, 2e-4]}, max_parallel=2,
                     targets=["evaluate@dpo"], name="tiny", repo=str(repo))
    assert len(res["experiments"]) == 4 and set(res["experiments"]) <= _exp_names(repo)
    rows = res["table"]
    assert {(r["train.variants.dpo.beta"], r["train.lr"]) for r in rows} == {
        (0.2, 1e-4), (0.2, 2e-4), (0.4, 1e-4), (0.4, 2e-4)}
    assert all(0 <= r["eval/dpo:test_accuracy"] <= 1 and "eval/dpo:heldout.delta_w" in r for r in rows)
    assert _artifacts("sweep-tiny")


@pytest.mark.slow
def test_rounds_flow_r2_samples_from_round1_policy(flowed_repo):
    import polars as pl

    from pipeline.flows import rounds_flow
    from pipeline.model.loading import fingerprint

    repo, _ = flowed_repo
    before = (repo / "params.yaml").read_text()
    res = rounds_flow(rounds=2, variant="dpo", name="onpol", repo=str(repo))
    r1, r2 = res["rounds"]
    # round 2's policy is round 1's trained model, and round 2 sampled from it
    assert r2["policy_model"] == r1["next_policy_model"]
    assert fingerprint(repo / r1["next_policy_model"]) == r1["trained_fingerprint"] == r2["policy_fingerprint"]
    assert r2["sample_fingerprint"] == r2["policy_fingerprint"] != r1["sample_fingerprint"]
    cands = {r: pl.read_parquet(repo / f"rounds/round_{r}/data/candidates.parquet") for r in (1, 2)}
    assert set(cands[1]["model"]) == {r1["sample_fingerprint"]} and set(cands[2]["model"]) == {r2["sample_fingerprint"]}
    round2_policy = json.loads((repo / "rounds/round_2/models/policy/pipeline.json").read_text())
    assert round2_policy["source"] == r1["next_policy_model"] and round2_policy["warmup"] is None
    assert r2["trained_from"] == r2["policy_fingerprint"]  # round 2 trained on top of its own policy
    assert {"policy", "sample", "train@dpo"} <= {s for s, st in r2["stages"].items() if st == "ran"}
    report = (repo / "rounds/report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and _artifacts("dpo-rounds")
    assert {"onpol-round-1", "onpol-round-2"} <= _exp_names(repo)
    assert (repo / "params.yaml").read_text() == before
    assert "rounds" not in run(["git", "status", "--porcelain"], repo)  # kept out of git


@pytest.mark.parametrize("env, expected", [({}, "False 120"),
                                           ({"PREFECT_SERVER_ANALYTICS_ENABLED": "true",
                                             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"}, "True 30")])
def test_flows_set_temporary_server_defaults_unless_set(env, expected):
    """The temporary Prefect server a flow starts sends no usage data (no network at run time) and gets
    120 s to start; a user's own settings win."""
    import subprocess
    import sys

    keys = ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    e = {k: v for k, v in os.environ.items() if k not in keys} | env
    code = ("import pipeline.flows; from prefect.settings import get_current_settings; s = get_current_settings(); "
            "print(s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds)")
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip().splitlines()[-1] == expected
