"""pipeline/flows/experiments.py: param overrides in the ``dvc exp run -S`` grammar, written by DVC's
own code; flattening and selecting metrics; grid points."""

from __future__ import annotations

import pytest
import yaml

from pipeline.flows import experiments


def test_overrides_written_by_dvc_keep_comments(shell_params):
    # overrides in the `dvc exp run -S` grammar, written by DVC's own code (comments kept)
    assert experiments.override_args({"a.x": 0.5, "p": "it's", "l": [1, "b"], "t": True}) == [
        "a.x=0.5",
        "p='it\\'s'",
        "l=[1, 'b']",
        "t=true",
    ]
    experiments.apply_overrides(shell_params, {"a.x": 5, "b.y": "/some/path with space"})
    text = (shell_params / "params.yaml").read_text()
    assert text.startswith("# shell pipeline") and yaml.safe_load(text)["b"]["y"] == "/some/path with space"
    assert yaml.safe_load(text)["a"]["x"] == 5


def test_flatten_select_and_grid():
    assert experiments.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    metrics = {
        "metrics/eval/dpo.json:test_accuracy": 0.5,
        "metrics/eval/dpo.json:variant": "dpo",
        "metrics/pairs.json:n_train": 8,
        "metrics/pairs.json:ok": True,
    }
    assert experiments.select_metrics(metrics, ["metrics/eval/*.json:test_*"]) == {
        "metrics/eval/dpo.json:test_accuracy": 0.5
    }
    assert experiments.select_metrics(metrics, []) == {
        "metrics/eval/dpo.json:test_accuracy": 0.5,
        "metrics/pairs.json:n_train": 8,
    }
    assert experiments.grid_points({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_a_point_refused_by_the_dvc_lock_is_tried_again(monkeypatch, tmp_path):
    from pipeline.flows.dvc_process import DvcRun, StageFailed

    calls = []
    lock_line = "ERROR: Unable to acquire lock. Most likely another DVC process is running"

    def fake_run_dvc(args, cwd, on_line=None, timeout_s=None, *, tail_lines):
        calls.append(args)
        if args[:2] == ["exp", "run"] and len(calls) < 4:
            return DvcRun(255, [lock_line], 0.1)
        return DvcRun(0, ["done"], 0.1)

    monkeypatch.setattr(experiments, "run_dvc", fake_run_dvc)
    monkeypatch.setattr(experiments, "_pause", lambda s: None)  # no real pauses in the test
    run = experiments.exp_run_temp(tmp_path, "p1", {"a.x": 1}, timeout_s=0, tail_lines=5)
    assert run.returncode == 0
    # each retry first removes what the refused attempt may have recorded under the name
    assert [c[:2] for c in calls] == [
        ["exp", "run"],
        ["exp", "remove"],
        ["exp", "run"],
        ["exp", "remove"],
        ["exp", "run"],
    ]
    assert calls[0][:5] == ["exp", "run", "--temp", "-n", "p1"] and calls[1] == ["exp", "remove", "p1"]

    # any other failure is not retried; a lock that stays busy fails after LOCK_TRIES attempts
    calls.clear()
    monkeypatch.setattr(experiments, "run_dvc", lambda args, *a, **k: calls.append(args) or DvcRun(1, ["boom"], 0.1))
    with pytest.raises(StageFailed, match="boom"):
        experiments.exp_run_temp(tmp_path, "p2", {}, timeout_s=0, tail_lines=5)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(
        experiments, "run_dvc", lambda args, *a, **k: calls.append(args) or DvcRun(255, [lock_line], 0.1)
    )
    with pytest.raises(StageFailed, match="Unable to acquire lock"):
        experiments.exp_run_temp(tmp_path, "p3", {}, timeout_s=0, tail_lines=5)
    assert len([c for c in calls if c[:2] == ["exp", "run"]]) == experiments.LOCK_TRIES


def test_a_refused_attempt_that_recorded_its_experiment_is_retried_cleanly(shell_repo, monkeypatch):
    """Seen with two sweeps side by side: DVC recorded the point's experiment, then gave up waiting for
    its lock; the retry then failed with "Experiment conflicts with existing experiment"."""
    from pipeline.flows.dvc_process import DvcRun

    real, refused = experiments.run_dvc, []

    def run_dvc(args, *a, **k):
        out = real(args, *a, **k)
        if args[:2] == ["exp", "run"] and not refused:  # it ran and recorded, then "lost the lock"
            assert out.returncode == 0, out.tail
            refused.append(args)
            return DvcRun(255, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"], 0.1)
        return out

    monkeypatch.setattr(experiments, "run_dvc", run_dvc)
    monkeypatch.setattr(experiments, "_pause", lambda s: None)
    assert experiments.taken_names(shell_repo, ["pt", "other"]) == []
    run = experiments.exp_run_temp(shell_repo, "pt", {"a.x": 7}, ["first"], timeout_s=0, tail_lines=20)
    assert refused and run.returncode == 0, run.tail
    assert experiments.taken_names(shell_repo, ["pt", "other"]) == ["pt"]
    [exp] = [e for e in experiments.experiments(shell_repo) if e["name"] == "pt"]
    assert exp["params"]["a.x"] == 7


def test_a_point_whose_experiment_was_recorded_is_not_failed_by_another_queued_point(monkeypatch, tmp_path):
    """DVC's queue race (seen in the scenarios flow test with two points side by side): the scenario-4
    `dvc exp run --temp` recorded its own experiment, then also ran scenario 3's queued entry, which failed,
    and exited with that failure. A recorded experiment is a success; one not recorded is a failure."""
    from pipeline.flows.dvc_process import DvcRun, StageFailed

    lines = []
    monkeypatch.setattr(
        experiments, "run_dvc", lambda args, *a, **k: DvcRun(255, ["ERROR: failed to reproduce 'pairs'"], 0.1)
    )
    monkeypatch.setattr(experiments, "experiments", lambda repo, all_commits=False: [{"name": "cmp-s4"}, {"name": "x"}])
    run = experiments.exp_run_temp(
        tmp_path, "cmp-s4", {"pairs.scenario": 4}, on_line=lines.append, timeout_s=0, tail_lines=5
    )
    assert run.returncode == 255 and "cmp-s4 was recorded" in lines[-1]
    with pytest.raises(StageFailed, match="failed to reproduce 'pairs'"):
        experiments.exp_run_temp(tmp_path, "cmp-s3", {"pairs.scenario": 3}, timeout_s=0, tail_lines=5)

    def no_answer(repo, all_commits=False):
        raise RuntimeError("dvc exp show failed")

    monkeypatch.setattr(experiments, "experiments", no_answer)
    with pytest.raises(StageFailed):
        experiments.exp_run_temp(tmp_path, "cmp-s4", {}, timeout_s=0, tail_lines=5)
