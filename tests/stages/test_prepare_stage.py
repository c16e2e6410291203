"""Stage `prepare`: prompt sets written from reasoning-gym or a file, bad rows quarantined or refused."""

from __future__ import annotations

import json
import logging

import polars as pl
import pytest
from repo_utils import write_params

from pipeline.data.prompt_file import R_DUP, PromptFileError
from pipeline.data.rows import R_JSON, R_MISSING


def good_objs(n=3):
    return [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- stage
@pytest.fixture
def stage(monkeypatch, tmp_path):
    from stages import prepare

    monkeypatch.chdir(tmp_path)
    return prepare


def test_stage_reasoning_gym(stage, tmp_path, caplog):
    prepare = {
        "source": "reasoning_gym",
        "reasoning_gym": {"task": "chain_sum", "config": {}, "seed": 5},
        "n_train": 12,
        "n_test": 6,
        "n_warmup": 4,
    }
    write_params(tmp_path / "params.yaml", {"prepare": prepare})
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        stage.main(["--params", "params.yaml"])
    df = pl.read_parquet(tmp_path / "data/prompts.parquet")
    assert df.height == 22
    assert df["prompt_id"].n_unique() == 22
    assert dict(df.group_by("split").len().iter_rows()) == {"train": 12, "test": 6, "warmup": 4}
    assert df["prompt"][0].endswith("'Answer: <number>'.")
    assert (tmp_path / "data/quarantine.jsonl").read_text() == ""
    m = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert m["splits"] == {"train": 12, "test": 6, "warmup": 4, "val": 0}
    assert m["quarantined"] == {"total": 0, "by_reason": {}}
    assert any("train=12 test=6 warmup=4 val=0" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)

    # validation prompts: 5 more problems of the task, every other prompt in the split it had
    write_params(tmp_path / "params.yaml", {"prepare": {**prepare, "n_val": 5}})
    stage.main(["--params", "params.yaml"])
    with_val = pl.read_parquet(tmp_path / "data/prompts.parquet")
    assert with_val.filter(pl.col("split") != "val").equals(df)
    assert with_val.filter(pl.col("split") == "val").height == 5
    assert json.loads((tmp_path / "metrics/prepare.json").read_text())["splits"]["val"] == 5


def test_stage_file_quarantine(stage, tmp_path, caplog):
    objs = good_objs(10) + [{"question": "What is 0 + 1?", "answer": "1"}, {"question": "Q?"}]
    write_jsonl(tmp_path / "in.jsonl", objs)
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(b"{not json\n")
    write_params(
        tmp_path / "params.yaml",
        {
            "prepare": {
                "source": "file",
                "file": {"path": "in.jsonl"},
                "on_bad_rows": "quarantine",
                "n_train": 5,
                "n_test": 3,
                "n_warmup": 0,
            }
        },
    )
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        stage.main(["--params", "params.yaml"])
    df = pl.read_parquet(tmp_path / "data/prompts.parquet")
    assert df.height == 8
    q = [json.loads(x) for x in (tmp_path / "data/quarantine.jsonl").read_text().splitlines()]
    assert [(x["row"], x["reason"]) for x in q] == [(11, R_DUP), (12, R_MISSING), (13, R_JSON)]
    m = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert m["rows_read"] == 13
    assert m["quarantined"]["total"] == 3
    assert m["quarantined"]["by_reason"] == {R_DUP: 1, R_MISSING: 1, R_JSON: 1}
    assert m["duplicates_removed"] == 1
    assert m["splits"] == {"train": 5, "test": 3, "warmup": 0, "val": 0}
    assert m["unused"] == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 bad input row" in warnings[0].getMessage()


def test_stage_error_mode_writes_nothing(stage, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", good_objs(5) + [{"question": "Q?"}])
    write_params(
        tmp_path / "params.yaml",
        {"prepare": {"source": "file", "file": {"path": "in.jsonl"}, "n_train": 2, "n_test": 1, "n_warmup": 0}},
    )
    with pytest.raises(PromptFileError, match=r"in\.jsonl: line 6, field 'answer'"):
        stage.main(["--params", "params.yaml"])
    assert not (tmp_path / "data/prompts.parquet").exists()
