"""Reading and validating a user's prompt file (``prepare.source: file``): JSONL or Parquet, optionally in the
layout of GSM8K or MATH (``prepare.file.preset``), with its columns mapped to ours (``prepare.file.fields``).

Good rows have ``question``, ``answer`` (the gold final answer, a string), ``solution`` (the gold worked
solution ending with a line ``Answer: <answer>``, or None), ``source`` and, when mapped, ``id``. Bad rows are
never dropped silently: they raise :class:`PromptFileError` (``on_bad_rows="error"``) or come back as
quarantine records (``"quarantine"``), always naming the file, the row and the field (the reading and that
rule are :mod:`pipeline.data.rows`, shared with pairs files).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pipeline.data.prompt_text import answer_line, last_boxed, normalize_question, split_gsm8k_answer, with_answer_line
from pipeline.data.rows import (
    R_MISSING,
    R_TYPE,
    RowError,
    check_on_bad_rows,
    jsonl_records,
    no_good_rows,
    parquet_records,
    validate_rows,
)

OUR_FIELDS = ("question", "answer", "solution", "id")
PRESETS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "answer": "answer"},
    "math": {"question": "problem", "answer": "solution"},
}
DEFAULT_FIELDS = {"question": "question", "answer": "answer", "solution": "solution"}

# Short, countable reasons for quarantine records (the full text is in "message"), beside those of rows.py.
R_EMPTY_Q = "empty question"
R_EMPTY_A = "empty answer"
R_MALFORMED = "malformed answer"
R_DUP = "duplicate question"
R_DUP_ID = "duplicate id"


class PromptFileError(ValueError):
    """A bad prompt file or row; the message names the file, the row and the field."""


def _resolve_fields(preset: str | None, fields: dict[str, str | None] | None) -> dict[str, str | None]:
    if preset is not None and preset not in PRESETS:
        raise PromptFileError(f"prepare.file.preset: unknown preset {preset!r} (use one of {sorted(PRESETS)})")
    mapping: dict[str, str | None] = dict(PRESETS[preset]) if preset else dict(DEFAULT_FIELDS)
    for key, col in (fields or {}).items():
        if key not in OUR_FIELDS:
            raise PromptFileError(f"prepare.file.fields.{key}: unknown field (use {list(OUR_FIELDS)})")
        if col is not None and (not isinstance(col, str) or not col):
            raise PromptFileError(f"prepare.file.fields.{key}: must be a column name or null, got {col!r}")
        mapping[key] = col
    for key in ("question", "answer"):
        if not mapping.get(key):
            raise PromptFileError(f"prepare.file.fields.{key}: required, cannot be null")
    return mapping


def _number_to_str(v: int | float) -> str | None:
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return None
    return str(int(v)) if v.is_integer() else repr(v)


def _col_label(ours: str, col: str) -> str:
    return f"'{col}'" if col == ours else f"'{col}' ({ours})"


def _parse_answer(a: object, acol: str, preset: str | None) -> tuple[str, str | None]:
    """The final answer of an answer field, and the worked solution when the preset's answer carries one."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        answer = _number_to_str(a)
        if answer is None:
            raise RowError(acol, R_TYPE, f"field {_col_label('answer', acol)} must be a finite number, got {a!r}")
        return answer, None
    if not isinstance(a, str):
        raise RowError(
            acol,
            R_TYPE,
            f"field {_col_label('answer', acol)} must be a string or a number, got {type(a).__name__} {a!r:.60}",
        )
    if not a.strip():
        raise RowError(acol, R_EMPTY_A, f"field {_col_label('answer', acol)} is empty")
    solution: str | None = None
    if preset == "gsm8k":
        parsed = split_gsm8k_answer(a)
        if parsed is None:
            raise RowError(
                acol, R_MALFORMED, f"field {_col_label('answer', acol)} has no '#### <answer>' line (preset gsm8k)"
            )
        answer, solution = parsed
    elif preset == "math":
        answer = last_boxed(a)
        if answer is None:
            raise RowError(
                acol,
                R_MALFORMED,
                f"field {_col_label('answer', acol)} has no complete \\boxed{{...}} answer (preset math)",
            )
        solution = f"{a.rstrip()}\n{answer_line(answer)}"
    else:
        answer = a.strip()
    if not answer:
        raise RowError(acol, R_EMPTY_A, f"field {_col_label('answer', acol)}: the final answer is empty")
    return answer, solution


def _parse_row(obj: dict, mapping: dict[str, str | None], preset: str | None) -> dict:
    """Validate one record; raises :class:`RowError` on the first problem."""
    qcol, acol = mapping["question"], mapping["answer"]
    assert qcol is not None and acol is not None  # _resolve_fields requires both
    scol, icol = mapping.get("solution"), mapping.get("id")

    if qcol not in obj:
        raise RowError(qcol, R_MISSING, f"field {_col_label('question', qcol)} is missing")
    q = obj[qcol]
    if not isinstance(q, str):
        raise RowError(
            qcol, R_TYPE, f"field {_col_label('question', qcol)} must be a string, got {type(q).__name__} {q!r:.60}"
        )
    if not q.strip():
        raise RowError(qcol, R_EMPTY_Q, f"field {_col_label('question', qcol)} is empty")

    if acol not in obj:
        raise RowError(acol, R_MISSING, f"field {_col_label('answer', acol)} is missing")
    answer, solution = _parse_answer(obj[acol], acol, preset)

    if scol and scol != acol and scol in obj:
        s = obj[scol]
        if s is not None and not isinstance(s, str):
            raise RowError(
                scol,
                R_TYPE,
                f"field {_col_label('solution', scol)} must be a string or null, got {type(s).__name__} {s!r:.60}",
            )
        if isinstance(s, str) and s.strip():
            solution = with_answer_line(s, answer)

    row = {"question": q.strip(), "answer": answer, "solution": solution}
    if icol:
        if icol not in obj:
            raise RowError(icol, R_MISSING, f"field {_col_label('id', icol)} is missing")
        i = obj[icol]
        if isinstance(i, bool) or not isinstance(i, (str, int)) or (isinstance(i, str) and not i.strip()):
            raise RowError(
                icol, R_TYPE, f"field {_col_label('id', icol)} must be a non-empty string or an integer, got {i!r:.60}"
            )
        row["id"] = str(i).strip()
    return row


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in ("jsonl", "parquet"):
            raise PromptFileError(f"prepare.file.format: unknown format {fmt!r} (use auto, jsonl or parquet)")
        return fmt
    ext = path.suffix.lower()
    if ext in (".jsonl", ".json"):
        return "jsonl"
    if ext in (".parquet", ".pq"):
        return "parquet"
    raise PromptFileError(
        f"{path}: cannot tell the format from the extension {ext!r}; set prepare.file.format to jsonl or parquet"
    )


def load_prompt_file(
    path: str | os.PathLike,
    *,
    format: Literal["auto", "jsonl", "parquet"],
    preset: str | None,
    fields: dict[str, str | None] | None,
    on_bad_rows: Literal["error", "quarantine"],
) -> tuple[list[dict], list[dict]]:
    """Read and validate a prompt file; returns (good rows, quarantined rows).

    Good rows have ``question``, ``answer``, ``solution``, ``source`` (and ``id`` when mapped).
    Quarantine records are ``{"file", "row", "field", "reason", "raw", "message"}``. With
    ``on_bad_rows="error"`` the first bad row raises :class:`PromptFileError`; a file with no valid
    row left raises in both modes.
    """
    check_on_bad_rows(on_bad_rows, "prepare.on_bad_rows", PromptFileError)
    if path is None or str(path) == "":
        raise PromptFileError("prepare.file.path: not set (needed when prepare.source is 'file')")
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found (check prepare.file.path)")
    mapping = _resolve_fields(preset, fields)
    fmt = _detect_format(path, format)
    records = jsonl_records(path, mapping.values()) if fmt == "jsonl" else parquet_records(path, PromptFileError)

    first_q: dict[str, str] = {}  # normalised question -> where
    first_id: dict[str, str] = {}
    source = f"file:{path.name}"

    qcol, icol = mapping["question"], mapping.get("id")
    assert qcol is not None  # _resolve_fields requires it

    def parse(obj: dict, where: str) -> dict:
        rec = _parse_row(obj, mapping, preset)
        key = normalize_question(rec["question"])
        if key in first_q:
            raise RowError(qcol, R_DUP, f"duplicate question, first seen at {first_q[key]}")
        if icol and rec["id"] in first_id:  # a record has an id when the id field is mapped
            raise RowError(icol, R_DUP_ID, f"duplicate id {rec['id']!r}, first seen at {first_id[rec['id']]}")
        first_q[key] = where
        if "id" in rec:
            first_id[rec["id"]] = where
        return {**rec, "source": source}

    good, bad = validate_rows(records, parse, file=path, on_bad_rows=on_bad_rows, error=PromptFileError)
    if not good:
        raise PromptFileError(no_good_rows(path, "prompt rows", bad))
    return good, bad
