"""Reading and writing tables: validated on read, never half-written."""

import polars as pl
import pytest

from pipeline.io import atomic_dir, atomic_path, read_table, write_table
from pipeline.schema import SchemaError

ROW = {
    "prompt_id": "a",
    "split": "train",
    "question": "q",
    "prompt": "q!",
    "answer": "1",
    "solution": None,
    "source": "t",
}


def test_read_table_validates(tmp_path):
    path = tmp_path / "p.parquet"
    write_table(pl.DataFrame([ROW]), path, "prompts")
    assert read_table(path, "prompts").row(0, named=True)["prompt_id"] == "a"
    pl.DataFrame([ROW]).drop("answer").write_parquet(path)
    with pytest.raises(SchemaError, match=str(path)):
        read_table(path, "prompts")


def test_crash_leaves_no_partial_output(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    d = tmp_path / "model"
    d.mkdir()
    (d / "old").write_text("keep")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in d.iterdir()] == ["old"] and list(tmp_path.iterdir()) == [d]  # no temp dir left
    with atomic_dir(d) as tmp:
        (tmp / "new").write_text("whole")
    assert [p.name for p in d.iterdir()] == ["new"]
