"""The flows on the real pipeline with the tiny config (all slow: test_e2e runs the pipeline with
`dvc repro` in the default suite): one pipeline_flow run end to end then a second that reruns nothing,
a param change recorded as an experiment, a 2x2 sweep, and two on-policy rounds."""

from __future__ import annotations

import json

import pytest
from repo_utils import copy_repo, make_repo, ran, run, tiny_params

ALL = {
    "prepare",
    "policy",
    "sample",
    "sample_other",
    "judge",
    "pairs",
    "reference",
    "train@dpo",
    "train@dpop",
    "evaluate@dpo",
    "evaluate@dpop",
    "export@dpo",
    "export@dpop",
    "report",
    "toy",
}


@pytest.fixture(scope="module")
def flowed(tmp_path_factory, tiny_model_dir, prefect_harness):
    """The tiny config in a temporary git repo, after one pipeline flow run (shared, never changed)."""
    from pipeline.flows.run import pipeline_flow

    repo = make_repo(tmp_path_factory.mktemp("flows"), tiny_params(tiny_model_dir))
    return repo, pipeline_flow(repo=str(repo))


@pytest.fixture
def flowed_repo(flowed, tmp_path):
    """A private copy of the flowed repo and the first run's result: each test changes its own."""
    return copy_repo(flowed[0], tmp_path / "repo"), flowed[1]


@pytest.mark.slow  # the real pipeline once more (test_e2e runs it with `dvc repro` in the default suite)
def test_pipeline_flow_end_to_end_then_nothing(flowed_repo, latest_artifact, task_runs):
    repo, first = flowed_repo
    assert set(first["ran"]) == ALL and set(first["order"]) == ALL
    order = first["order"]
    assert (
        order.index("prepare")
        < order.index("policy")
        < order.index("sample")
        < order.index("judge")
        < order.index("pairs")
        < order.index("reference")
        < order.index("train@dpo")
        < order.index("evaluate@dpo")
        < order.index("report")
    )
    # the same outputs `dvc repro` makes: DVC finds every stage up to date
    assert ran(run(["dvc", "repro"], repo)) == set()
    for rel in (
        "data/prompts.parquet",
        "data/candidates.parquet",
        "data/pairs.parquet",
        "data/reference.parquet",
        "models/dpo/config.json",
        "models/dpop/config.json",
        "metrics/eval/dpo.json",
        "reports/main/report.md",
        "data/toy/history.parquet",
    ):
        assert (repo / rel).is_file(), rel
    assert "| dpo |" in latest_artifact("dpo-report").data
    assert any(r["file"] == "metrics/eval/dpo.json" for r in json.loads(latest_artifact("dpo-metrics").data))
    assert [r for r in task_runs("train@dpo")] and task_runs("evaluate@dpop")

    from pipeline.flows.run import pipeline_flow

    second = pipeline_flow(repo=str(repo))
    assert second["ran"] == [] and set(second["stages"].values()) == {"skipped"}


@pytest.mark.slow
def test_pipeline_flow_param_change_is_an_experiment(flowed_repo, exp_names):
    from pipeline.flows.run import pipeline_flow

    repo, _ = flowed_repo
    before = (repo / "params.yaml").read_text()
    res = pipeline_flow(overrides={"train.variants.dpo.beta": 0.3}, repo=str(repo))
    assert set(res["ran"]) == {"train@dpo", "evaluate@dpo", "export@dpo", "report"}
    assert res["experiment"] and res["experiment"] in exp_names(repo)
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    assert res["experiment"] in show and "0.3" in show
    assert (repo / "params.yaml").read_text() == before


@pytest.mark.slow
def test_sweep_flow_tiny_2x2(flowed_repo, artifacts, exp_names):
    from pipeline.flows.sweep import sweep_flow

    repo, _ = flowed_repo
    res = sweep_flow(
        grid={"train.variants.dpo.beta": [0.2, 0.4], "train.lr": [1e-4, 2e-4]},
        max_parallel=2,
        targets=["evaluate@dpo"],
        name="tiny",
        repo=str(repo),
    )
    assert len(res["experiments"]) == 4 and set(res["experiments"]) <= exp_names(repo)
    rows = res["table"]
    assert {(r["train.variants.dpo.beta"], r["train.lr"]) for r in rows} == {
        (0.2, 1e-4),
        (0.2, 2e-4),
        (0.4, 1e-4),
        (0.4, 2e-4),
    }
    assert all(0 <= r["eval/dpo:test_accuracy"] <= 1 and "eval/dpo:heldout.delta_w" in r for r in rows)
    assert artifacts("sweep-tiny")


@pytest.mark.slow
def test_rounds_flow_r2_samples_from_round1_policy(flowed_repo, artifacts, exp_names):
    import polars as pl

    from pipeline.flows.rounds import rounds_flow
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
    assert "| 1 |" in report and "| 2 |" in report and artifacts("dpo-rounds")
    assert {"onpol-round-1", "onpol-round-2"} <= exp_names(repo)
    assert (repo / "params.yaml").read_text() == before
    assert "rounds" not in run(["git", "status", "--porcelain"], repo)  # kept out of git
