"""Stage `policy`: its greedy accuracy on the validation prompts (prepare.n_val), only where there are any."""

from __future__ import annotations

import polars as pl
from repo_utils import write_params

from pipeline.io import read_json, write_table


def test_the_starting_policy_is_scored_on_the_validation_prompts(tmp_path, monkeypatch, tiny_model_dir):
    from stages import policy

    monkeypatch.chdir(tmp_path)
    write_params(
        tmp_path / "params.yaml",
        {
            "policy": {"model": str(tiny_model_dir), "warmup": {"enabled": False}, "eval": {"max_new_tokens": 4}},
            "evaluate": {"generation": {"max_new_tokens": 4}},
        },
    )
    rows = [("t0", "test"), ("t1", "test"), ("v0", "val"), ("v1", "val"), ("v2", "val"), ("w0", "warmup")]
    prompts = pl.DataFrame(
        {
            "prompt_id": [p for p, _ in rows],
            "split": [s for _, s in rows],
            "question": [f"What is {i} + 1?" for i in range(len(rows))],
            "prompt": [f"What is {i} + 1?" for i in range(len(rows))],
            "answer": [str(i + 1) for i in range(len(rows))],
            "solution": None,
            "source": "test",
        },
        schema_overrides={"solution": pl.String},
    )
    write_table(prompts, "data/prompts.parquet", "prompts")
    policy.main(["--params", "params.yaml"])
    m = read_json("metrics/policy.json")
    assert (m["n_test"], m["n_val"]) == (2, 3) and 0.0 <= m["val_accuracy"] <= 1.0
    assert pl.read_parquet("data/policy/generations.parquet")["prompt_id"].to_list() == ["t0", "t1"]

    write_table(prompts.filter(pl.col("split") != "val"), "data/prompts.parquet", "prompts")
    policy.main(["--params", "params.yaml"])
    assert "val_accuracy" not in read_json("metrics/policy.json")
