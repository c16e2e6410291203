"""Table schemas: a bad row is named by file, row and field."""

import polars as pl
import pytest

from pipeline.schema import SchemaError, conform

ROW = {
    "prompt_id": "a",
    "split": "train",
    "question": "q",
    "prompt": "q!",
    "answer": "1",
    "solution": None,
    "source": "t",
}


def test_conform_names_file_row_and_field():
    df = pl.DataFrame([ROW, {**ROW, "prompt_id": "b", "answer": None}])
    with pytest.raises(SchemaError, match=r"f\.parquet: row 1, field 'answer': null"):
        conform(df, "prompts", "f.parquet")
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['source'\]"):
        conform(pl.DataFrame([ROW]).drop("source"), "prompts", "f.parquet")
    bad = pl.DataFrame(
        {"pair_id": ["x", "y"], "ref_w": ["1.0", "oops"], "ref_l": [0.0, 0.0], "len_w": [1, 1], "len_l": [1, 1]}
    )
    with pytest.raises(SchemaError, match=r"row 1, field 'ref_w'"):
        conform(bad, "reference", "r.parquet")
