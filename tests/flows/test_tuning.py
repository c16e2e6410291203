"""pipeline/flows/tuning.py: the grid's experiments and their params, a grid the settings refuse failing before any
experiment runs, and (slow) tuning_flow over the pipeline of small Python stages (tests/flows/study_pipeline.py):
the grid on one seed, the selection on validation accuracy, the kept settings over the seeds, the report."""

from __future__ import annotations

import json

import pytest
from flows.study_pipeline import study_repo
from repo_utils import PROJECT, repo_params


def _study(tune: dict | None = None, **study):
    from pipeline.flows.settings import parse_flow_params
    from pipeline.settings.base import merged

    flows = merged(repo_params()["flows"], {"study": study})
    if tune:
        flows["study"]["tune"].update(tune)
    return parse_flow_params(flows).study


def test_tune_points_set_the_variant_the_seed_and_the_validation_prompts():
    from pipeline.flows.tuning import kept_points, tune_points

    st = _study({"grid": {"dpo": {"lr": [1e-6, 1e-5], "beta": [0.1]}, "dpop": {"dpop_lambda": [5.0]}}, "seed": 7})
    grid = tune_points("x", st)
    assert list(grid) == ["x-tune-dpo-0", "x-tune-dpo-1", "x-tune-dpop-0"]
    variant, setting, point = grid["x-tune-dpo-1"]
    assert (variant, setting) == ("dpo", {"lr": 1e-5, "beta": 0.1})
    assert point == {
        **st.overrides,
        "prepare.n_val": st.tune.n_val,
        "train.seed": 7,
        "++train.variants.dpo.lr": 1e-5,
        "++train.variants.dpo.beta": 0.1,
    }
    assert "sample.seed" not in point
    assert tune_points("x", _study(sample_seed=True))["x-tune-dpo-0"][2]["sample.seed"] == 0

    from pipeline.analysis.tuning import GridPoint

    kept = {"dpo": GridPoint("x-tune-dpo-1", "dpo", {"lr": 1e-5, "beta": 0.1}, None)}
    final = kept_points("y", st, kept)
    assert list(final) == [f"y-d-seed{s}" for s in st.seeds]
    assert final["y-d-seed1"][2] == {
        **st.overrides,
        "prepare.n_val": st.tune.n_val,
        "++train.variants.dpo.lr": 1e-5,
        "++train.variants.dpo.beta": 0.1,
        "train.seed": 1,
    }


def test_tune_settings_are_validated_with_the_key_named():
    from pipeline.flows.settings import FlowParamsError

    assert _study().tune.grid["dpo"]["beta"] == repo_params()["flows"]["study"]["tune"]["grid"]["dpo"]["beta"]
    for tune, msg in (
        ({"grid": {}}, r"flows\.study\.tune\.grid: .*at least 1 item"),
        ({"grid": {"dpo": {}}}, r"flows\.study\.tune\.grid: .*dpo: needs at least one setting"),
        ({"grid": {"dpo": {"lr": []}}}, r"flows\.study\.tune\.grid: .*dpo\.lr: needs at least one value"),
        (
            {"grid": {"dpo": {"lr": [1e-5, 1e-5]}}},
            r"flows\.study\.tune\.grid: .*dpo\.lr: a value listed more than once",
        ),
        ({"n_val": 0}, r"flows\.study\.tune\.n_val"),
        ({"typo": 1}, r"flows\.study\.tune\.typo"),
    ):
        with pytest.raises(FlowParamsError, match=msg):
            _study(tune)


def test_a_grid_the_settings_refuse_fails_naming_the_experiment_and_key(tmp_path):
    import shutil

    from pipeline.flows.tuning import check_points
    from pipeline.settings.base import ConfigError

    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    check_points(tmp_path, {"ok": {"++train.variants.dpo.lr": 2e-6, "prepare.n_val": 8}})
    with pytest.raises(ConfigError, match=r"tuning experiment bad: .*train\.variants\.dpo\.beta.*must be > 0"):
        check_points(tmp_path, {"ok": {"++train.variants.dpo.beta": 0.3}, "bad": {"++train.variants.dpo.beta": -1.0}})
    with pytest.raises(ConfigError, match=r"tuning experiment bad: .*train\.variants\.dpo\.lr"):
        check_points(tmp_path, {"bad": {"++train.variants.dpo.lr": 0}})


@pytest.mark.slow
def test_tuning_flow_selects_on_validation_and_compares_the_kept_settings(
    tmp_path_factory, prefect_harness, exp_names, latest_artifact
):
    from pipeline.flows.experiments import experiments
    from pipeline.flows.tuning import tuning_flow

    grid = {"dpo": {"lr": [1e-5], "beta": [0.1, 0.3]}, "dpop": {"lr": [1e-5, 5e-6], "dpop_lambda": [50.0]}}
    repo, params = study_repo(
        tmp_path_factory.mktemp("tuningflow"), {"tune": {"grid": grid, "n_val": 20, "report": "out/tuning"}}
    )
    res = tuning_flow(seeds=[0, 1], overrides={"prepare.n_test": 40}, name="tn", repo=str(repo))
    grid_names = {"tn-tune-dpo-0", "tn-tune-dpo-1", "tn-tune-dpop-0", "tn-tune-dpop-1"}
    assert grid_names | {"tn-d-seed0", "tn-d-seed1"} <= exp_names(repo)
    # the pipeline's validation accuracy: dpo 0.2 + beta, dpop 0.6 at lr 5e-6 else 0.3
    assert res["selected"] == {
        "dpo": {"experiment": "tn-tune-dpo-1", "setting": {"lr": 1e-5, "beta": 0.3}, "val_accuracy": 0.5},
        "dpop": {"experiment": "tn-tune-dpop-1", "setting": {"lr": 5e-6, "dpop_lambda": 50.0}, "val_accuracy": 0.6},
    }
    # the kept settings trained over the seeds (a grid experiment trains its own variant alone)
    exps = {e["name"]: e["params"] for e in experiments(repo)}
    assert (
        exps["tn-d-seed1"]["train.variants.dpo.beta"] == 0.3
        and float(exps["tn-d-seed1"]["train.variants.dpop.lr"]) == 5e-6
    )
    assert exps["tn-d-seed1"]["prepare.n_val"] == 20 and exps["tn-d-seed1"]["train.seed"] == 1
    assert exps["tn-tune-dpo-1"]["train.seed"] == 0 and "lr" not in str(
        exps["tn-tune-dpo-1"].get("train.variants.dpop")
    )
    out = repo / "out" / "tuning"
    summary = json.loads((out / "summary.json").read_text())
    tuning = summary["tuning"]
    assert tuning["policy_val_accuracy"] == 0.25 and tuning["n_val"] == 20 and tuning["grid"] == grid
    assert [p["val_accuracy"]["estimate"] for p in tuning["points"]] == [0.3, 0.5, 0.3, 0.6]
    (c,) = tuning["comparisons"]
    assert (c["a"], c["b"], c["seeds"]) == ("dpo", "dpop", [0, 1])
    assert c["delta_w_difference"]["low"] > 0  # DPOP's Δlp_w +0.5 against DPO's about -2
    assert summary["command"].endswith("--tune --report out/tuning") and summary["failed"] == []
    md = (out / "report.md").read_text()
    assert md.startswith("# Tuned comparison `tn`") and "## Grid and selection" in md and md.count("**kept**") == 2
    assert md.index("## Grid and selection") < md.index("## Claims") and latest_artifact("dpo-study-tune").data == md
    # rebuilt from the same experiments without running any
    (out / "report.md").unlink()
    again = tuning_flow(seeds=[0, 1], overrides={"prepare.n_test": 40}, name="tn", repo=str(repo), report_only=True)
    assert again["selected"] == res["selected"] and (out / "report.md").read_text() == md
    assert set(summary["run"]["seconds"]) == {"grid", "kept settings"}
