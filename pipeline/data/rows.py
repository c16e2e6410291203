"""Reading the rows of a user's JSONL or Parquet file, each either validated or quarantined.

Shared by the prompt files of the prepare stage (:mod:`pipeline.data.prompt_file`) and the pairs files
of the pairs stage (:mod:`pipeline.data.trl_format`): the same line reader, the same quarantine
record ``{"file", "row", "field", "reason", "raw", "message"}``, and the same rule for a bad row,
raise naming the file, the row and the field (``on_bad_rows="error"``) or quarantine it and count
it (``"quarantine"``). Never dropped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import polars as pl

# Short, countable reasons (each format adds its own); the full text is in the record's "message".
R_MISSING = "missing field"
R_TYPE = "wrong type"
R_UTF8 = "invalid utf-8"
R_JSON = "invalid json"
WHOLE_LINE = "(whole line)"  # the field of a row that is not a JSON object at all

OnBadRows = Literal["error", "quarantine"]
# (row number, where it is in words, the raw text, the record or why it is not one)
Record = tuple[int, str, str, "dict | RowError"]


class RowError(Exception):
    """One bad row: the field at fault, a short countable ``reason`` and the ``detail`` for people."""

    def __init__(self, field: str, reason: str, detail: str):
        super().__init__(detail)
        self.field, self.reason, self.detail = field, reason, detail


def check_on_bad_rows(value: str, key: str, error: type[ValueError]) -> None:
    if value not in ("error", "quarantine"):
        raise error(f"{key}: must be 'error' or 'quarantine', got {value!r}")


def jsonl_records(path: Path, fields: Iterable[str | None]) -> Iterator[Record]:
    """Each non-blank line of a JSON Lines file; rows are 1-based line numbers.

    A line that is not UTF-8, not JSON or not an object comes as a :class:`RowError`; for bad
    bytes the field named is the first of ``fields`` (then the line's own keys) holding them (None:
    a field with no column)."""
    fields = list(fields)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, bline in enumerate(data.split(b"\n"), start=1):
        bline = bline.rstrip(b"\r")
        raw = bline.decode("utf-8", errors="replace")
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        where = f"line {lineno}"
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            field = WHOLE_LINE
            try:  # name the field that holds the bad bytes when the rest of the line parses
                obj = json.loads(raw)
                if isinstance(obj, dict):
                    field = next(
                        (c for c in [*fields, *obj] if c and isinstance(obj.get(c), str) and "\ufffd" in obj[c]),
                        WHOLE_LINE,
                    )
            except ValueError:
                pass
            yield lineno, where, raw, RowError(field, R_UTF8, f"invalid UTF-8 at byte {e.start} of the line")
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            yield (
                lineno,
                where,
                raw,
                RowError(WHOLE_LINE, R_JSON, f"not valid JSON ({e}); the file must be JSON Lines, one object per line"),
            )
            continue
        if not isinstance(obj, dict):
            yield (
                lineno,
                where,
                raw,
                RowError(
                    WHOLE_LINE,
                    R_JSON,
                    f"expected a JSON object, got "
                    f"{type(obj).__name__}; the file must be JSON "
                    "Lines, one object per line",
                ),
            )
            continue
        yield lineno, where, raw, obj


def parquet_records(path: Path, error: type[ValueError]) -> list[Record]:
    """Every row of a Parquet file (rows are 0-based indices); an unreadable file raises ``error``."""
    try:
        df = pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - polars/arrow raise many types
        raise error(f"{path}: cannot read as Parquet: {e}") from None
    return [
        (idx, f"row {idx} (0-based index)", json.dumps(obj, ensure_ascii=False, default=str), obj)
        for idx, obj in enumerate(df.iter_rows(named=True))
    ]


def validate_rows(
    records: Iterable[Record],
    parse: Callable[[dict, str], dict],
    *,
    file: Path | str,
    on_bad_rows: OnBadRows,
    error: type[ValueError],
) -> tuple[list[dict], list[dict]]:
    """``parse(record, where)`` of each record: (its results, quarantine records of the rows it refused).

    ``parse`` raises :class:`RowError` for a bad row (and updates any state it keeps, such as the
    rows seen, only for a good one). With ``on_bad_rows="error"`` the first bad row raises ``error``
    with ``"<file>: <where>, field '<field>': <detail>"``; else it is quarantined with that message.
    """
    good: list[dict] = []
    bad: list[dict] = []
    for row, where, raw, obj in records:
        try:
            if isinstance(obj, RowError):
                raise obj
            good.append(parse(obj, where))
        except RowError as e:
            message = f"{file}: {where}, field '{e.field}': {e.detail}"
            if on_bad_rows == "error":
                raise error(message) from None
            bad.append(
                {"file": str(file), "row": row, "field": e.field, "reason": e.reason, "raw": raw, "message": message}
            )
    return good, bad


def no_good_rows(path: str | os.PathLike, what: str, bad: list[dict]) -> str:
    """The message of a file left with no valid row, quoting the first bad one."""
    detail = f"; {len(bad)} bad row(s), the first: {bad[0]['message']}" if bad else ""
    return f"{path}: no valid {what}{detail}"
