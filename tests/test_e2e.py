"""The real `dvc repro` on a tiny config (tiny random model, a handful of prompts) in a temporary git
repo: all outputs appear, a second repro does nothing, and a params change reruns only what it must."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def tiny_params(model_dir: Path) -> dict:
    p = yaml.safe_load((PROJECT / "params.yaml").read_text())
    p["prepare"].update(n_train=10, n_test=4, n_warmup=4)
    p["policy"].update(model=str(model_dir))
    p["policy"]["warmup"].update(batch_size=4, lr=1e-3)
    p["policy"]["eval"].update(max_new_tokens=6, batch_size=8)
    p["sample"].update(n=3, max_new_tokens=6, batch_size=12)
    # A random tiny model gets every answer wrong, so all its groups tie: pair the gold solution
    # against its worst sample (scenario 2) to have something to train on.
    p["pairs"].update(scenario=2, heldout_fraction=0.3)
    p["reference"].update(max_length=96)
    p["train"].update(epochs=1, batch_size=4, lr=1e-4, max_length=96)
    p["evaluate"]["generation"].update(max_new_tokens=6, batch_size=8)
    p["toy"].update(steps=20, sft_steps=50, losses=["dpo", "dpop"], scenarios=[1])
    return p


def make_repo(root: Path, params: dict) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, repo / name)
    for pkg in ("pipeline", "stages"):
        shutil.copytree(PROJECT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        run(cmd, repo)
    return repo


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, path: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, last = path.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


ALL = {"prepare", "policy", "sample", "judge", "pairs", "reference", "train@dpo", "train@dpop",
       "evaluate@dpo", "evaluate@dpop", "report", "toy"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir):
    return make_repo(tmp_path_factory.mktemp("e2e"), tiny_params(tiny_model_dir))


def test_dvc_repro_end_to_end_and_reruns(repo):
    out = run(["dvc", "repro"], repo)
    assert ran(out) == ALL, out[-3000:]

    # Outputs of every stage, valid against their schemas
    from pipeline.io import read_json, read_table

    prompts = read_table(repo / "data/prompts.parquet", "prompts")
    assert prompts.group_by("split").len().sort("split").rows() == [("test", 4), ("train", 10), ("warmup", 4)]
    cands = read_table(repo / "data/candidates.parquet", "candidates")
    assert len(cands) == 30 and set(cands["candidate_idx"]) == {0, 1, 2}
    pairs = read_table(repo / "data/pairs.parquet", "pairs")
    assert len(pairs) > 0 and set(pairs["scenario"]) == {2} and set(pairs["chosen_source"]) == {"gold"}
    assert set(pairs["split"]) == {"train", "heldout"}
    ref = read_table(repo / "data/reference.parquet", "reference")
    assert ref["pair_id"].to_list() == pairs["pair_id"].to_list() and (ref["ref_w"] < 0).all()
    for v in ("dpo", "dpop"):
        assert (repo / f"models/{v}/config.json").is_file()
        ev = read_json(repo / f"metrics/eval/{v}.json")
        assert 0 <= ev["test_accuracy"] <= 1 and ev["heldout"]["n_pairs"] == int((pairs["split"] == "heldout").sum())
        lp_w = pl.read_csv(repo / f"dvclive/train/{v}/plots/metrics/lp_w.tsv", separator="\t")
        assert len(lp_w) >= 1 and lp_w["lp_w"].is_finite().all()
    report = (repo / "reports/main/report.md").read_text()
    assert "| dpo |" in report and "| dpop |" in report and (repo / "reports/main/logprobs.png").is_file()
    assert "dpop" in run(["dvc", "plots", "show", "--json"], repo)

    # Nothing changed: nothing reruns
    assert ran(run(["dvc", "repro"], repo)) == set()

    # beta of one variant: only that variant and what comes after it
    set_param(repo, "train.variants.dpo.beta", 0.3)
    assert ran(run(["dvc", "repro"], repo)) == {"train@dpo", "evaluate@dpo", "report"}

    # sampling temperature: from sampling on, not before
    set_param(repo, "sample.temperature", 1.2)
    again = ran(run(["dvc", "repro"], repo))
    assert {"sample", "judge", "pairs"} <= again and not again & {"prepare", "policy"}
    assert "report" in again or "reference" in again
