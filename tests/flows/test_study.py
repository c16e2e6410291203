"""pipeline/flows/study.py: the experiments' params, and (slow) study_flow over a pipeline of small Python
stages whose tables depend on train.seed, read back from each experiment through DVC."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import polars as pl
import pytest
import yaml
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
    sized = study_command(st)
    assert sized.startswith("python -m pipeline.flows study --seeds 0 1 2 --variants dpo dpop -S prepare.n_test=512")
    plain = study_command(st.model_copy(update={"overrides": {}, "scenarios": [1, 4]}))
    assert plain.endswith("--scenarios 1 4 --default-size")
    a = parser().parse_args(plain.split()[3:])
    assert (a.seeds, a.variants, a.scenarios, a.default_size) == ([0, 1, 2], ["dpo", "dpop"], [1, 4], True)


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


TABLES_PY = textwrap.dedent('''\
    """Writes the tables the study reads; its numbers depend on train.seed (DPO's fall and DPOP's rise)."""
    import sys
    from pathlib import Path

    import numpy as np
    import polars as pl
    import yaml

    from pipeline.io import write_table

    p = yaml.safe_load(open("params.yaml"))
    n_test, seed = p["prepare"]["n_test"], p["train"]["seed"]
    prompts = [f"q{i:03d}" for i in range(n_test)]
    if sys.argv[1] == "policy":
        write_table(pl.DataFrame({"prompt_id": prompts, "model": "policy", "text": "", "extracted_answer": None,
                                  "correct": [i % 2 == 0 for i in range(n_test)]}), "data/policy/generations.parquet",
                    "generations")
        # the pairs' edit distances: the study reads pair_id and edit_distance_norm of the training pairs
        pl.DataFrame({"pair_id": [f"t{i:02d}" for i in range(20)],
                      "edit_distance_norm": np.linspace(0.05, 0.6, 20)}).write_parquet("data/pairs.parquet")
        sys.exit(0)
    variant = sys.argv[2]
    rng = np.random.default_rng(10 * seed + (variant == "dpop"))
    n = 30
    d_w = (-2.0 - 0.1 * seed if variant == "dpo" else 0.5) + 0.3 * rng.normal(size=n)
    out = Path("data/eval") / variant
    out.mkdir(parents=True, exist_ok=True)
    write_table(pl.DataFrame({"pair_id": [f"p{i:02d}" for i in range(n)], "variant": variant, "ref_w": -20.0,
                              "ref_l": -25.0, "lp_w": -20.0 + d_w, "lp_l": -30.0 + rng.normal(size=n),
                              "len_w": 17, "len_l": 17, "edit_distance_norm": np.linspace(0.05, 0.6, n),
                              "distance_bucket": "x", "ches": 0.0, "ches_norm": 0.0}),
                out / "pairs.parquet", "pair_eval")
    write_table(pl.DataFrame({"prompt_id": prompts, "model": variant, "text": "", "extracted_answer": None,
                              "correct": [bool(x) for x in rng.random(n_test) < (0.1 if variant == "dpo" else 0.5)]}),
                out / "generations.parquet", "generations")
    train = Path("data/train") / variant
    train.mkdir(parents=True, exist_ok=True)
    (train / "notes.txt").write_text(variant)
    if variant == "dpo":  # fixed-set curves of the training subset (dpop's training scored none)
        dist = np.linspace(0.05, 0.6, 20)
        rows = [{"step": step, "set": "train", "pair_id": f"t{i:02d}", "lp_w": -20.0 + d, "lp_l": -30.0,
                 "ref_w": -20.0, "ref_l": -25.0, "len_w": 17, "len_l": 17, "log10_grad_ratio": None}
                for step, ds in ((0, np.zeros(20)), (9, -4.0 + 6.0 * dist + 0.2 * rng.normal(size=20)))
                for i, d in enumerate(ds)]
        write_table(pl.DataFrame(rows), train / "fixed_curves.parquet", "fixed_curves")
    ''')

STUDY_DVC_YAML = textwrap.dedent("""\
    stages:
      policy:
        cmd: python tables.py policy
        deps: [tables.py]
        params: [prepare.n_test]
        outs: [data/policy/generations.parquet, data/pairs.parquet]
      evaluate:
        foreach: [dpo, dpop]
        do:
          cmd: python tables.py eval ${item}
          deps: [tables.py, data/policy/generations.parquet]
          params: [prepare.n_test, train.seed]
          outs:
            - data/eval/${item}
            - data/train/${item}
    """)


@pytest.mark.slow
def test_study_flow_reads_every_seeds_tables_and_judges_the_claims(
    tmp_path_factory, prefect_harness, exp_names, latest_artifact
):
    from pipeline.flows.study import study_flow

    repo = tmp_path_factory.mktemp("studyflow") / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(STUDY_DVC_YAML)
    (repo / "tables.py").write_text(TABLES_PY)
    params = repo_params()
    params["flows"]["study"].update({"report": "out/study", "max_parallel": 2})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        run(cmd, repo)
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
    assert "`python -m pipeline.flows study --seeds 0 1 2 --variants dpo dpop -S prepare.n_test=40`" in md
    assert (repo / "params.yaml").read_text() == yaml.safe_dump(params, sort_keys=False)  # temp experiments only
    # the report rebuilt from the same experiments, running none, after a new commit (the experiments are based
    # on the previous one); a seed never run is reported missing
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
    assert "failed or are missing** and are left out: st-d-seed3" in again
    # a typo in a variant fails before any experiment runs
    with pytest.raises(ValueError, match=r"no stage evaluate@dpx: not in train.variants \(known: dpo, dpop\)"):
        study_flow(variants=["dpx"], name="typo", repo=str(repo))
    shutil.rmtree(out)
