"""`python -m pipeline.bench.trainer --quick`: the trainer benchmark end to end at tiny sizes, on synthesized
pairs and on the pipeline's own pairs with the reference stage's log-probs. TRL's configurations take a
minute even at these sizes and stay out of the default suite."""

from __future__ import annotations

import json
import shutil

import pytest
from repo_utils import run_module, write_params, write_stage_workspace

from pipeline.bench import trainer as bench_trainer
from pipeline.settings.params import Params

TINY_TOL = 1e-3  # the tiny model's log-probs at one precision agree to <= 3e-5 nats (test_reference_stage.py)


def test_quick_run_on_synthesized_pairs_writes_its_figures(tmp_path):
    write_params(tmp_path / "params.yaml")
    proc = run_module("pipeline.bench.trainer", ["--quick", "--threads", "1", "--out", "bench.json"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench.json").read_text())
    cfg = Params.load(tmp_path / "params.yaml")
    variant = next(iter(cfg.train.variants.values()))
    assert out["bench"] == "trainer" and set(out) >= {"settings", "environment", "pairs", "results", "ratios"}
    assert out["pairs"].startswith(f"synthesized ({bench_trainer.QUICK.n_synth} {cfg.prepare.reasoning_gym.task}")
    settings = out["settings"]
    assert settings["variant"] == variant.name and settings["losses"] == [t.model_dump() for t in variant.losses]
    assert settings["train"]["max_length"] == cfg.train.max_length and settings["train"]["bf16"] == cfg.train.bf16
    assert settings["train"]["batch_size"] == bench_trainer.QUICK.batch_size
    assert list(out["results"]) == ["ours"] and out["ratios"] == {}
    ours = out["results"]["ours"]
    assert ours["steps"] == bench_trainer.QUICK.steps == len(ours["step_s"])
    assert ours["tokens"] > 0 and ours["tokens_per_s"] > 0 and ours["tokens_per_cpu_s"] > 0 and ours["seconds"] > 0
    assert ours["ids_identical_to_ours"] == (bench_trainer.QUICK.steps + 1) * bench_trainer.QUICK.batch_size
    assert 0 <= ours["ref_gap_per_token"] <= ours["ref_gap_mean"] <= ours["ref_gap_max"] <= TINY_TOL
    assert ours["abs_peak_mb"] > 0


@pytest.fixture
def pipeline_outputs(tmp_path, monkeypatch, tiny_model_dir):
    """The pipeline's own pairs, policy folder and reference log-probs (the reference stage run on them)."""
    from stages import reference

    write_stage_workspace(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    reference.main(["--params", "params.yaml"])
    return tmp_path


def test_ours_on_the_pipelines_pairs_passes_the_first_step_reference_check(pipeline_outputs, capsys):
    """The benchmark trains the reference stage's model (models/policy) at its precision, layout and
    truncation, so its first step finds the policy at the reference, as the train stage's does."""
    assert bench_trainer.main(["--quick", "--threads", "1", "--out", "bench.json"]) == 0
    out = json.loads((pipeline_outputs / "bench.json").read_text())
    cfg = Params.load("params.yaml")
    reference_metrics = json.loads((pipeline_outputs / "metrics/reference.json").read_text())
    assert out["pairs"] == "data/pairs.parquet (4 training pairs), reference log-probs from data/reference.parquet"
    assert out["settings"]["model"] == str((pipeline_outputs / "models/policy").resolve())
    train = out["settings"]["train"]
    assert (train["bf16"], train["shared_prompt"], train["max_length"]) == (
        cfg.train.bf16,
        cfg.train.shared_prompt,
        cfg.reference.max_length,
    )
    assert out["environment"]["bf16_autocast"] == reference_metrics["bf16_autocast"]
    ours = out["results"]["ours"]
    assert ours["ref_check_tol"] == cfg.train.ref_check_tol
    assert 0 <= ours["ref_gap_per_token"] <= ours["ref_gap_mean"] <= ours["ref_gap_max"] <= TINY_TOL
    assert ours["tokens_per_s"] > 0


def test_a_policy_other_than_the_references_fails_the_first_step(pipeline_outputs, other_tiny_model_dir, capsys):
    """models/policy replaced after the reference stage ran: the benchmark trains it on the old reference
    log-probs and the trainer's first-step check refuses, as it would in the train stage."""
    shutil.rmtree(pipeline_outputs / "models/policy")
    shutil.copytree(other_tiny_model_dir, pipeline_outputs / "models/policy")
    with pytest.raises(SystemExit, match="ours failed"):
        bench_trainer.main(["--quick", "--threads", "1"])
    assert "first step: the policy's log-probs differ from the reference's" in capsys.readouterr().out
