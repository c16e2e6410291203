"""The real `dvc repro` on the tiny config with `pairs.source` a user's pairs file: training, evaluation and
the report run on those pairs, and nothing is sampled or judged."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import yaml
from repo_utils import make_repo, ran, run, tiny_params

from pipeline.io import read_json, read_table

N_PAIRS = 16


def ultrafeedback_rows(n: int) -> list[dict]:
    """An UltraFeedback-binarised-style set: prompt string, whole conversations, scores and other columns."""
    rows = []
    for i in range(n):
        q = f"Add {i} and {2 * i + 1}."
        conv = [{"role": "user", "content": q}]
        rows.append(
            {
                "prompt": q,
                "prompt_id": f"uf{i:02d}",
                "chosen": conv + [{"role": "assistant", "content": f"{i} + {2 * i + 1} = {3 * i + 1}"}],
                "rejected": conv + [{"role": "assistant", "content": f"It is {3 * i + 4}, I think."}],
                "messages": conv,
                "score_chosen": 9.0,
                "score_rejected": 2.5,
            }
        )
    return rows


@pytest.mark.slow
def test_tiny_pipeline_trains_and_reports_on_imported_pairs(tmp_path, tiny_model_dir):
    params = tiny_params(tiny_model_dir)
    params["pairs"].update(source="my_pairs.jsonl", inputs=["my_pairs.jsonl"] * 3)
    repo = make_repo(tmp_path, params)
    rows = ultrafeedback_rows(N_PAIRS)
    (repo / "my_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # Training needs the policy and the pairs, not the samplers or the judge
    assert ran(run(["dvc", "repro", "train@dpo"], repo)) == {"prepare", "policy", "pairs", "reference", "train@dpo"}
    assert not (repo / "data/candidates.parquet").exists() and not (repo / "data/judge").exists()
    pairs = read_table(repo / "data/pairs.parquet", "pairs")
    assert sorted(pairs["prompt_id"]) == [r["prompt_id"] for r in rows]
    assert set(pairs["split"]) == {"train", "heldout"} and set(pairs["chosen_source"]) == {"imported"}
    assert set(read_table(repo / "data/reference.parquet", "reference")["pair_id"]) == set(pairs["pair_id"])
    n_train = int((pairs["split"] == "train").sum())
    # Trained on the imported training pairs, every epoch in whole batches: one logged loss per optimiser step
    train, live = params["train"], repo / "dvclive/train/dpo"
    batches = n_train / train["batch_size"]
    n_steps = train["epochs"] * (max(1, math.floor(batches)) if train["tail"] == "drop" else math.ceil(batches))
    assert yaml.safe_load((live / "params.yaml").read_text())["n_pairs"] == n_train
    assert pl.read_csv(live / "plots/metrics/loss.tsv", separator="\t")["step"].to_list() == list(range(n_steps))
    m = read_json(repo / "metrics/pairs.json")
    assert (m["source"], m["scenario"], m["n_train"], m["exported"]["test"]) == (
        "my_pairs.jsonl",
        "imported",
        n_train,
        N_PAIRS - n_train,
    )

    # The displacement diagnostics and the report on the imported held-out pairs
    out = run(["dvc", "repro", "report"], repo)
    assert ran(out) == {"train@dpop", "evaluate@dpo", "evaluate@dpop", "report"}
    ev = pl.read_parquet(repo / "data/eval/dpo/pairs.parquet")
    assert set(ev["pair_id"]) == set(pairs.filter(pl.col("split") == "heldout")["pair_id"])
    assert (repo / "reports/main/report.md").is_file()

    # An edit to the file reruns the pairs and what follows, still without sampling or judging
    (repo / "my_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    again = ran(run(["dvc", "repro", "train@dpo"], repo))
    assert "pairs" in again and not again & {"sample", "sample_other", "judge"}
