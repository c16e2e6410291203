import polars as pl
import pytest

from pipeline.io import atomic_dir, atomic_path, read_table, write_table
from pipeline.schema import SchemaError, conform

ROW = {"prompt_id": "a", "split": "train", "question": "q", "prompt": "q!", "answer": "1", "solution": None,
       "source": "t"}


def test_conform_names_file_row_and_field():
    df = pl.DataFrame([ROW, {**ROW, "prompt_id": "b", "answer": None}])
    with pytest.raises(SchemaError, match=r"f\.parquet: row 1, field 'answer': null"):
        conform(df, "prompts", "f.parquet")
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['source'\]"):
        conform(pl.DataFrame([ROW]).drop("source"), "prompts", "f.parquet")
    bad = pl.DataFrame({"pair_id": ["x", "y"], "ref_w": ["1.0", "oops"], "ref_l": [0.0, 0.0],
                        "len_w": [1, 1], "len_l": [1, 1]})
    with pytest.raises(SchemaError, match=r"row 1, field 'ref_w'"):
        conform(bad, "reference", "r.parquet")


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
