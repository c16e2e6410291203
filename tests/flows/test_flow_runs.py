"""pipeline_flow and sweep_flow on a throwaway dvc.yaml of shell commands (a fresh ``shell_repo`` per
test): stage order, retries, failures, timeouts, overrides recorded as experiments."""

from __future__ import annotations

import pytest
import yaml
from repo_utils import run


def test_flow_retries_overrides_and_failures(shell_repo, prefect_harness, artifacts, task_runs):
    from pipeline.flows.dvc_process import StageFailed
    from pipeline.flows.experiments import experiments
    from pipeline.flows.run import pipeline_flow

    # first run: every stage runs; `flaky` fails once and its retry succeeds
    res = pipeline_flow(repo=str(shell_repo))
    assert res["order"] == ["first", "second@p", "second@q", "flaky"]
    assert set(res["ran"]) == {"first", "second@p", "second@q", "flaky"} and res["experiment"] is None
    assert (shell_repo / "flaky.txt").is_file()
    [flaky_run] = task_runs("flaky")
    assert flaky_run.run_count == 2 and flaky_run.state.is_completed()
    assert artifacts("dpo-metrics") and artifacts("dpo-stages")

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
    text = (
        (shell_repo / "dvc.yaml")
        .read_text()
        .replace("echo 'bad is about to fail' && exit 3", "echo 'bad is sleeping' && sleep 60")
    )
    (shell_repo / "dvc.yaml").write_text(text)
    with pytest.raises(StageFailed, match=r"'bad' failed \(timed out after 1 s\)"):
        pipeline_flow(targets=["bad"], repo=str(shell_repo))


@pytest.mark.slow
def test_sweep_flow_on_shell_pipeline(shell_repo, prefect_harness, artifacts, exp_names):
    from pipeline.flows.sweep import sweep_flow

    res = sweep_flow(
        grid={"a.x": [1, 2], "b.y": [3, 4]}, max_parallel=2, targets=["second"], name="grid", repo=str(shell_repo)
    )
    assert res["experiments"] == ["grid-1", "grid-2", "grid-3", "grid-4"]
    assert {(r["a.x"], r["b.y"], r["m_p:y"]) for r in res["table"]} == {(1, 3, 3), (1, 4, 4), (2, 3, 3), (2, 4, 4)}
    assert {"grid-1", "grid-2", "grid-3", "grid-4"} <= exp_names(shell_repo)
    [art] = artifacts("sweep-grid")
    assert art.type == "table"
