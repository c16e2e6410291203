"""The shared row reader: one rule for a bad row (raise naming file, row and field, or quarantine and count)."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.data import rows


class FileError(ValueError):
    pass


def _parse_numbers(seen: list):
    def parse(obj: dict, where: str) -> dict:
        if not isinstance(obj.get("x"), int):
            raise rows.RowError("x", rows.R_TYPE, f"field 'x' must be an integer, got {obj.get('x')!r}")
        seen.append(where)  # state changes only for good rows
        return {"x": obj["x"], "where": where}

    return parse


def test_quarantine_keeps_good_rows_and_records_every_bad_one(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"x": 1}\n\n{"x": "two"}\nnot json\n[1]\n{"x": 5, "s": "\xff"}\n')
    seen: list = []
    good, bad = rows.validate_rows(
        rows.jsonl_records(f, ["s"]), _parse_numbers(seen), file=f, on_bad_rows="quarantine", error=FileError
    )
    assert good == [{"x": 1, "where": "line 1"}] and seen == ["line 1"]
    assert [(b["row"], b["field"], b["reason"]) for b in bad] == [
        (3, "x", rows.R_TYPE),
        (4, rows.WHOLE_LINE, rows.R_JSON),
        (5, rows.WHOLE_LINE, rows.R_JSON),
        (6, "s", rows.R_UTF8),
    ]
    assert bad[0]["message"] == f"{f}: line 3, field 'x': field 'x' must be an integer, got 'two'"
    assert bad[0]["file"] == str(f) and bad[0]["raw"] == '{"x": "two"}'


def test_error_mode_raises_on_the_first_bad_row_naming_file_row_and_field(tmp_path):
    f = tmp_path / "in.parquet"
    pl.DataFrame({"x": [1, None, 3]}).write_parquet(f)
    with pytest.raises(FileError, match=r"in\.parquet: row 1 \(0-based index\), field 'x': .*got None"):
        rows.validate_rows(
            rows.parquet_records(f, FileError), _parse_numbers([]), file=f, on_bad_rows="error", error=FileError
        )


def test_unreadable_parquet_and_bad_setting_raise_the_callers_error(tmp_path):
    f = tmp_path / "broken.parquet"
    f.write_text("not parquet")
    with pytest.raises(FileError, match="broken.parquet: cannot read as Parquet"):
        rows.parquet_records(f, FileError)
    with pytest.raises(FileError, match="pairs.on_bad_rows: must be 'error' or 'quarantine', got 'skip'"):
        rows.check_on_bad_rows("skip", "pairs.on_bad_rows", FileError)
    assert (
        rows.no_good_rows(f, "pairs", [{"message": "m1"}, {"message": "m2"}])
        == f"{f}: no valid pairs; 2 bad row(s), the first: m1"
    )
