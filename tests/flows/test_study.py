"""pipeline/flows/study.py: the experiments' params, and (slow) study_flow over a pipeline of small Python
stages whose tables depend on train.seed and pairs.scenario (tests/flows/study_pipeline.py), read back from each
experiment through DVC: the default pair set, and the four scenarios with their section and claim 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from flows.study_pipeline import study_repo
from repo_utils import repo_params, run

PROJECT = Path(__file__).resolve().parents[2]


def test_study_points():
    from pipeline.flows.study import study_points

    pts = study_points([0, 1], [], {"prepare.n_test": 512}, sample_seed=False)
    assert pts == [
        ("default", 0, {"prepare.n_test": 512, "train.seed": 0}),
        ("default", 1, {"prepare.n_test": 512, "train.seed": 1}),
    ]
    pts = study_points([3], [1, 4], {}, sample_seed=True)
    assert pts == [
        ("scenario 1", 3, {"train.seed": 3, "sample.seed": 3, "pairs.source": "judged", "pairs.scenario": 1}),
        ("scenario 4", 3, {"train.seed": 3, "sample.seed": 3, "pairs.source": "judged", "pairs.scenario": 4}),
    ]


def test_study_command_runs_the_same_study_again():
    from pipeline.flows.cli import parser
    from pipeline.flows.settings import parse_flow_params
    from pipeline.flows.study import study_command

    st = parse_flow_params(repo_params()["flows"]).study
    sized = study_command(st, tune=False)
    assert sized.startswith("python -m pipeline.flows study --seeds 0 1 2 --variants dpo dpop -S prepare.n_test=512")
    plain = study_command(st.model_copy(update={"overrides": {}, "scenarios": [1, 4]}), tune=False)
    assert plain.endswith("--scenarios 1 4 --default-size --report reports/study")
    a = parser().parse_args(plain.split()[3:])
    assert (a.seeds, a.variants, a.scenarios, a.default_size, a.report, a.tune) == (
        [0, 1, 2],
        ["dpo", "dpop"],
        [1, 4],
        True,
        "reports/study",
        False,
    )
    tune = study_command(st, tune=True)
    assert "--variants" not in tune and tune.endswith("--tune --report reports/tuning")
    a = parser().parse_args(tune.split()[3:])
    assert (a.tune, a.report, a.set_param[0]) == (True, "reports/tuning", "prepare.n_test=512")


def test_run_record_keeps_the_times_of_the_run_when_the_report_is_rebuilt(tmp_path):
    from pipeline.flows.study import run_record

    record, line = run_record(tmp_path, {"grid": 790.4, "kept settings": 1500.0})
    assert record is not None and record["seconds"] == {"grid": 790, "kept settings": 1500}
    assert line.strip().endswith("grid 13 min, kept settings 25 min.") and record["cpus"] >= 1
    assert run_record(tmp_path, None) == (None, "")  # rebuilt, and no earlier summary: nothing to say
    (tmp_path / "summary.json").write_text(json.dumps({"run": record}))
    assert run_record(tmp_path, None) == (record, line)


def test_study_settings_are_validated_with_the_key_named():
    from pipeline.flows.settings import FlowParamsError, parse_flow_params
    from pipeline.settings.base import merged

    flows = repo_params()["flows"]
    assert parse_flow_params(flows).study.seeds == flows["study"]["seeds"]
    with pytest.raises(FlowParamsError, match=r"flows\.study\.scenarios\.1: Input should be 1, 2, 3 or 4 \(got 5\)"):
        parse_flow_params(merged(flows, {"study": {"scenarios": [1, 5]}}))
    with pytest.raises(FlowParamsError, match=r"flows\.study\.seeds: .*1 listed more than once"):
        parse_flow_params(merged(flows, {"study": {"seeds": [0, 1, 1]}}))
    with pytest.raises(FlowParamsError, match=r"flows\.study\.variants: .*at least 1 item"):
        parse_flow_params(merged(flows, {"study": {"variants": []}}))


@pytest.mark.slow
def test_study_flow_reads_every_seeds_tables_and_judges_the_claims(
    tmp_path_factory, prefect_harness, exp_names, latest_artifact
):
    from pipeline.flows.study import study_flow

    repo, params = study_repo(tmp_path_factory.mktemp("studyflow"), {"report": "out/study", "max_parallel": 2})
    res = study_flow(seeds=[0, 1, 2], overrides={"prepare.n_test": 40}, name="st", repo=str(repo))
    assert {"st-d-seed0", "st-d-seed1", "st-d-seed2"} <= exp_names(repo)
    out = repo / "out" / "study"
    summary = json.loads((out / "summary.json").read_text())
    # every seed's own tables: DPO's mean Δlp_w is -2 - 0.1 * seed plus noise of sd 0.3 / sqrt(30)
    per_seed = {(r["variant"], r["seed"]): r for r in summary["per_seed"]}
    assert [per_seed[("dpo", s)]["delta_w"] for s in (0, 1, 2)] == pytest.approx([-2.0, -2.1, -2.2], abs=0.2)
    assert len({round(per_seed[("dpo", s)]["delta_w"], 6) for s in (0, 1, 2)}) == 3  # not one table read thrice
    assert all(r["accuracy_before"] == 0.5 for r in summary["per_seed"])  # 40 prompts, every other one right
    per_pair = pl.read_parquet(out / "per_pair.parquet")
    assert per_pair.height == 3 * 2 * 30 and sorted(per_pair["seed"].unique()) == [0, 1, 2]
    verdicts = {c["claim"].split(" (")[0] + ": " + c["measure"]: c["verdict"] for c in summary["claims"]}
    assert verdicts["dpo: pooled mean Δlp_w per pair (nats)"] == "reproduced"
    assert verdicts["dpop: pooled mean Δlp_w per pair (nats)"] == "reproduced"  # lp_w rose above the reference
    # the edit-distance claim on dpo's fixed training subset (last scored step), slope 6 by construction
    slope = next(c for c in summary["claims"] if "edit distance" in c["claim"])
    assert "fixed training subset" in slope["measure"] and slope["verdict"] == "reproduced"
    assert slope["estimate"] == pytest.approx(6.0, abs=0.5)
    md = (out / "report.md").read_text()
    assert res["markdown"] == md and latest_artifact("dpo-study").data == md
    assert (
        "`python -m pipeline.flows study --seeds 0 1 2 --variants dpo dpop -S prepare.n_test=40 --report out/study`"
        in md
    )
    assert "## Scenarios" not in md and "scenarios" not in summary  # no scenario: no scenario section
    assert (repo / "params.yaml").read_text() == yaml.safe_dump(params, sort_keys=False)  # temp experiments only
    # the report rebuilt from the same experiments, running none, after a new commit (the experiments are based
    # on the previous one); a seed never run is reported missing
    assert summary["run"]["seconds"]["experiments"] > 0 and "Wall-clock time of the experiments" in md
    (out / "report.md").unlink()
    (repo / "notes.md").write_text("later work\n")
    for cmd in (
        ["git", "add", "notes.md"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "later"],
    ):
        run(cmd, repo)
    with pytest.raises(RuntimeError, match=r"1 of 4 experiments failed: st-d-seed3"):
        study_flow(seeds=[0, 1, 2, 3], overrides={"prepare.n_test": 40}, name="st", repo=str(repo), report_only=True)
    again = (out / "report.md").read_text()

    def claims(text):
        return text.split("## Claims (docs/losses.md)")[1].split("## Per variant")[0]

    assert claims(again) == claims(md) and "--seeds 0 1 2 3 " in again
    assert json.loads((out / "summary.json").read_text())["run"] == summary["run"]  # the run's times, kept
    assert "failed or are missing** and are left out: st-d-seed3" in again
    # a typo in a variant fails before any experiment runs
    with pytest.raises(ValueError, match=r"no stage evaluate@dpx: not in train.variants \(known: dpo, dpop\)"):
        study_flow(variants=["dpx"], name="typo", repo=str(repo))
    shutil.rmtree(out)


@pytest.mark.slow
def test_the_scenario_study_reports_each_scenario_and_judges_the_ordering(tmp_path_factory, prefect_harness):
    """Scenarios 1-4 over two seeds into their own report folder: the counts of the shared held-out prompts, the
    on-policy measures, McNemar per seed and claim 3 (scenario 1's Δlp_w is -0.5, the others' -3)."""
    from pipeline.data.pairs import is_heldout
    from pipeline.flows.study import study_flow

    repo, params = study_repo(tmp_path_factory.mktemp("scenariostudy"), {"max_parallel": 2})
    res = study_flow(
        seeds=[0, 1],
        variants=["dpo"],
        scenarios=[1, 2, 3, 4],
        overrides={"prepare.n_test": 40},
        name="sc",
        repo=str(repo),
        report="out/scenarios",
    )
    out = repo / "out" / "scenarios"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["experiments"]) == [f"sc-s{k}-seed{s}" for k in (1, 2, 3, 4) for s in (0, 1)]
    assert summary["command"].endswith("--scenarios 1 2 3 4 -S prepare.n_test=40 --report out/scenarios")
    assert not (repo / "reports").exists()  # flows.study.report untouched
    held = sum(
        is_heldout(f"{k}{i:02d}", params["pairs"]["heldout_fraction"], params["pairs"]["seed"])
        for k, n in (("h", 30), ("t", 20))
        for i in range(n)
    )
    sets = {r["scenario"]: r for r in summary["scenarios"]["pair_sets"]}
    assert sets["scenario 3"]["heldout_prompts_with_pair"] == 20 and sets["scenario 1"]["heldout_prompts"] == held
    assert sets["scenario 2"]["chosen_per_token"]["estimate"] == pytest.approx(-1.0)  # -5 * 2 over 10 tokens
    assert len(summary["scenarios"]["mcnemar"]) == 8  # 4 scenarios x 2 seeds, one variant
    ordering = {c["scenario"]: c for c in summary["claims"] if c["source"] == "claim 3"}
    assert ordering["1, 2, 3, 4"]["verdict"] == "reproduced"
    assert ordering["scenario 1 vs 3"]["n"] == 20 and ordering["scenario 1 vs 2"]["estimate"] == pytest.approx(
        2.5, abs=0.3
    )
    md = (out / "report.md").read_text()
    assert res["markdown"] == md and "## Scenarios" in md and "| scenario 3 | policy/other | 2 | 20 of " in md
