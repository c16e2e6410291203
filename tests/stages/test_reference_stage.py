"""Stage `reference` (and `evaluate`, `train` on its output): log-probs at training's precision
(`train.bf16`), so that the first training step and an untrained model's held-out pairs sit exactly
at the reference, and the train stage records its first-step check."""

from __future__ import annotations

import json
import shutil

import polars as pl

from pipeline.io import read_table, write_table
from pipeline.model import loading
from pipeline.settings.params import Params
from pipeline.training.examples import join_reference, pair_examples
from pipeline.training.trainer import train_preference

N_PAIRS = 8  # the `workspace` fixture's pairs (tests/stages/conftest.py), half of them held out
TINY_TOL = 1e-3


def test_reference_stage_scores_at_trainings_precision(workspace):
    from stages import reference

    reference.main(["--params", "params.yaml"])
    assert json.loads((workspace / "metrics/reference.json").read_text())["bf16_autocast"] is True
    cfg = Params.load("params.yaml")
    assert cfg.train.bf16
    ref = read_table("data/reference.parquet", "reference")
    train = read_table("data/pairs.parquet", "pairs").filter(pl.col("split") == "train")
    ex = pair_examples(join_reference(train, ref))
    model, tok = loading.load_policy("models/policy", "float32")
    # The stage's settings, bf16 autocast included, with a tolerance for the tiny model's small logits:
    # <= 3e-5 nats between two bf16 computations, 2e-3 to 1e-2 between bf16 and fp32.
    s = cfg.train.variants["dpo"].settings.model_copy(update={"ref_check_tol": TINY_TOL})
    hist = train_preference(model, ex, cfg.train.variants["dpo"].losses, s, pad_id=tok.pad_token_id)
    assert hist[0]["ref_gap_max"] <= TINY_TOL <= cfg.train.ref_check_tol


def test_untrained_model_evaluates_at_the_reference(workspace):
    """evaluate@dpo on a copy of the starting policy: its held-out log-probs are the reference's. The
    two stages batch the pairs differently; only the precision could tell them apart (tiny model: <= 3e-5
    nats apart at one precision, up to ~1e-2 between bf16 and fp32)."""
    from stages import evaluate, reference

    reference.main(["--params", "params.yaml"])
    shutil.copytree("models/policy", "models/dpo")
    (workspace / "metrics/policy.json").write_text(json.dumps({"test_accuracy": 0.0}))
    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    table = read_table("data/eval/dpo/pairs.parquet", "pair_eval")
    assert table.height == N_PAIRS // 2
    gaps = (table["lp_w"] - table["ref_w"]).abs().to_list() + (table["lp_l"] - table["ref_l"]).abs().to_list()
    assert max(gaps) < TINY_TOL / 2, gaps


def test_train_stage_records_the_first_step_check(workspace):
    from stages import reference, train

    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])
    metrics = json.loads((workspace / "dvclive/train/dpo/metrics.json").read_text())
    check, tol = metrics["ref_check"], Params.load("params.yaml").train.ref_check_tol
    assert check["tol"] == tol and check["passed"] is True
    assert 0 <= check["gap_per_token"] <= check["gap_mean"] <= check["gap_max"] <= TINY_TOL


def test_train_stage_without_held_out_pairs_scores_the_training_set_only(workspace):
    """pairs.heldout_fraction 0 (or pairs that are all training pairs): no empty fixed set is scored."""
    from stages import reference, train

    pairs = read_table("data/pairs.parquet", "pairs").with_columns(pl.lit("train").alias("split"))
    write_table(pairs, "data/pairs.parquet", "pairs")
    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])
    curves = read_table("data/train/dpo/fixed_curves.parquet", "fixed_curves")
    assert set(curves["set"]) == {"train"} and curves.filter(pl.col("step") == 0).height == N_PAIRS


def test_evaluate_reuses_the_training_stages_last_held_out_scoring(workspace, monkeypatch):
    """After train@dpo, evaluate@dpo takes the held-out log-probs of the training stage's last fixed-set
    scoring (by the model it saved) instead of a second forward pass; they equal a fresh computation on the
    saved model. Without fixed curves (train.eval_every 0) it computes them itself."""
    from pipeline.model.logprobs import pair_logprobs
    from stages import evaluate, reference, train

    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])
    (workspace / "metrics/policy.json").write_text(json.dumps({"test_accuracy": 0.0}))
    monkeypatch.setattr(evaluate, "pair_logprobs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    m = json.loads((workspace / "metrics/eval/dpo.json").read_text())
    curves = read_table("data/train/dpo/fixed_curves.parquet", "fixed_curves")
    last = int(curves["step"].max())
    assert m["heldout_scored_by"] == f"train@dpo (fixed held-out set after step {last})"
    table = read_table("data/eval/dpo/pairs.parquet", "pair_eval").sort("pair_id")
    assert table.height == N_PAIRS // 2 and table["lp_w"].null_count() == 0
    want = curves.filter((pl.col("step") == last) & (pl.col("set") == "heldout")).sort("pair_id")
    assert table["lp_w"].to_list() == want["lp_w"].to_list()
    # an independent forward pass on the saved model gives the same numbers (the saved model is the scored one)
    cfg = Params.load("params.yaml")
    pairs = read_table("data/pairs.parquet", "pairs").filter(pl.col("split") == "heldout").sort("pair_id")
    model = loading.load_model("models/dpo", "float32").eval()
    lw, ll, _, _ = pair_logprobs(model, pairs, loading.load_tokenizer("models/dpo").pad_token_id, 4, cfg.train)
    assert max(abs(a - b) for a, b in zip(lw + ll, table["lp_w"].to_list() + table["lp_l"].to_list())) < TINY_TOL
    # no fixed curves: computed here
    (workspace / "data/train/dpo/fixed_curves.parquet").unlink()
    monkeypatch.setattr(evaluate, "pair_logprobs", pair_logprobs)
    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    m = json.loads((workspace / "metrics/eval/dpo.json").read_text())
    assert m["heldout_scored_by"] == "evaluate@dpo"
    again = read_table("data/eval/dpo/pairs.parquet", "pair_eval").sort("pair_id")
    assert (again["lp_w"] - table["lp_w"]).abs().max() < TINY_TOL
