"""Stage `evaluate@<variant>`: with validation prompts (prepare.n_val) it also scores greedy accuracy on them, per
prompt in its own table, and the test answers are those of a run without them."""

from __future__ import annotations

import json
import shutil

import polars as pl

from pipeline.io import read_json, read_table, write_table


def _evaluate(workspace) -> tuple[pl.DataFrame, dict]:
    from stages import evaluate

    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    return read_table("data/eval/dpo/generations.parquet", "generations"), read_json("metrics/eval/dpo.json")


def test_validation_prompts_are_scored_apart_from_the_test_prompts(workspace):
    from stages import reference

    reference.main(["--params", "params.yaml"])
    shutil.copytree("models/policy", "models/dpo")
    (workspace / "metrics/policy.json").write_text(json.dumps({"test_accuracy": 0.0}))
    test_answers, metrics = _evaluate(workspace)
    assert "val_accuracy" not in metrics and not (workspace / "data/eval/dpo/val_generations.parquet").exists()

    prompts = read_table("data/prompts.parquet", "prompts")
    val = pl.DataFrame(
        {
            "prompt_id": [f"v{i}" for i in range(3)],
            "split": "val",
            "question": [f"What is {i} + 5?" for i in range(3)],
            "prompt": [f"What is {i} + 5?" for i in range(3)],
            "answer": [str(i + 5) for i in range(3)],
            "solution": None,
            "source": "test",
        },
        schema=prompts.schema,
    )
    write_table(pl.concat([prompts, val]), "data/prompts.parquet", "prompts")
    again, metrics = _evaluate(workspace)
    assert again.equals(test_answers)  # the test prompts' answers do not depend on the validation prompts
    answers = read_table("data/eval/dpo/val_generations.parquet", "generations")
    assert answers["prompt_id"].to_list() == ["v0", "v1", "v2"] and set(answers["model"]) == {"dpo"}
    assert metrics["n_val"] == 3 and metrics["val_accuracy"] == answers["correct"].mean()
