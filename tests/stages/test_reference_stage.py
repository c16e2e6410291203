"""Stage `reference` (and `evaluate`, `train` on its output): log-probs at training's precision
(`train.bf16`), so that the first training step and an untrained model's held-out pairs sit exactly
at the reference, and the train stage records its first-step check."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
from repo_utils import write_params

from pipeline.config import load_params
from pipeline.io import read_table, write_table
from pipeline.model import loading
from pipeline.model import logprobs as LP
from pipeline.model.logprobs import encode_prompt, encode_response
from pipeline.training.trainer import PairExample, train_preference

N_PAIRS = 8
TINY_TOL = 1e-3


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_dir):
    """A policy folder, prompts and pairs (train and held-out); train.bf16 (the default) autocasts on CPU
    as it does on a GPU."""
    monkeypatch.setattr(LP, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    shutil.copytree(tiny_model_dir, tmp_path / "models/policy")
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts, pairs = [], []
    for i in range(N_PAIRS):
        q = f"What is {i} + {3 * i}?" + " Be brief." * (i % 3)
        split = "heldout" if i % 2 else "train"
        prompts.append({"prompt_id": f"p{i}", "split": "test" if i % 2 else "train", "question": q, "prompt": q,
                        "answer": str(4 * i), "solution": None, "source": "test"})
        w = encode_response(tok, "So" + " then" * (2 * i % 5) + f" {4 * i}")
        l_ = encode_response(tok, f"It is {4 * i + 1}" + ", surely" * (i % 4))
        pairs.append({"pair_id": f"p{i}-s1", "prompt_id": f"p{i}", "split": split, "prompt_ids": encode_prompt(tok, q),
                      "chosen_ids": w, "rejected_ids": l_, "chosen_text": "", "rejected_text": "",
                      "chosen_source": "policy", "rejected_source": "policy", "chosen_correct": True,
                      "rejected_correct": False, "chosen_sampler_logprob": None, "rejected_sampler_logprob": None,
                      "chosen_policy_logprob": -1.0, "rejected_policy_logprob": -2.0, "scenario": 1,
                      "edit_distance": 3, "edit_distance_norm": 0.3, "first_diff": 0, "len_w": len(w), "len_l": len(l_)})
    write_table(pl.DataFrame(prompts), tmp_path / "data/prompts.parquet", "prompts")
    write_table(pl.DataFrame(pairs), tmp_path / "data/pairs.parquet", "pairs")
    write_params(tmp_path / "params.yaml", {
        "policy": {"model": str(tmp_path / "models/policy")},
        "evaluate": {"generation": {"max_new_tokens": 4, "batch_size": 4}}})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_reference_stage_scores_at_trainings_precision(workspace):
    from stages import reference

    reference.main(["--params", "params.yaml"])
    assert json.loads((workspace / "metrics/reference.json").read_text())["bf16_autocast"] is True
    cfg = load_params("params.yaml")
    assert cfg.train.bf16
    ref = read_table("data/reference.parquet", "reference")
    data = read_table("data/pairs.parquet", "pairs").filter(pl.col("split") == "train").join(ref, on="pair_id")
    ex = [PairExample(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), r["ref_w"], r["ref_l"])
          for r in data.iter_rows(named=True)]
    model = loading.load_model("models/policy", "float32")
    tok = loading.load_tokenizer("models/policy")
    # The stage's settings, bf16 autocast included, with a tolerance for the tiny model's small logits:
    # <= 3e-5 nats between two bf16 computations, 2e-3 to 1e-2 between bf16 and fp32.
    s = cfg.variants["dpo"].settings.model_copy(update={"ref_check_tol": TINY_TOL})
    hist = train_preference(model, ex, cfg.variants["dpo"].losses, s, pad_id=tok.pad_token_id, progress=None)
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
    check, tol = metrics["ref_check"], load_params("params.yaml").train.ref_check_tol
    assert check["tol"] == tol and check["passed"] is True
    assert 0 <= check["gap_mean"] <= check["gap_max"] <= TINY_TOL
