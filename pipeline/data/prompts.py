"""Prompt sets for the prepare stage: generation, file loading, validation, dedup and splits.

Two sources give ``rows``, dicts with ``question``, ``answer`` (gold final answer, a string),
``solution`` (gold worked solution ending with a line ``Answer: <answer>``, or None), ``source``
and, for files with an id column, ``id``:

* :func:`generate_reasoning_gym` - a procedural reasoning-gym task, deterministic in its seed;
* :func:`load_prompt_file` - a JSONL or Parquet file, optionally in the layout of GSM8K or MATH.

Bad input rows are never dropped silently: they raise :class:`PromptFileError` (``on_bad_rows=
"error"``) or come back as quarantine records (``"quarantine"``), always naming the file, the row
and the field (the reading and that rule are :mod:`pipeline.data.rows`, shared with pairs files).
:func:`collect_prompts` puts it together for the stage, :func:`split_prompts` assigns test / train /
warmup and :func:`build_prompts_frame` makes the ``prompts`` table.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import polars as pl

from pipeline.data.rows import (R_JSON, R_MISSING, R_TYPE, R_UTF8, WHOLE_LINE,  # noqa: F401 (reasons re-exported)
                                RowError, check_on_bad_rows, jsonl_records, no_good_rows, parquet_records, validate_rows)

OUR_FIELDS = ("question", "answer", "solution", "id")
PRESETS: dict[str, dict[str, str]] = {
    "gsm8k": {"question": "question", "answer": "answer"},
    "math": {"question": "problem", "answer": "solution"},
}
DEFAULT_FIELDS = {"question": "question", "answer": "answer", "solution": "solution"}
SPLITS = ("test", "train", "warmup")  # assignment order

# Short, countable reasons for quarantine records (the full text is in "message").
R_EMPTY_Q = "empty question"
R_EMPTY_A = "empty answer"
R_MALFORMED = "malformed answer"
R_DUP = "duplicate question"
R_DUP_ID = "duplicate id"


class PromptFileError(ValueError):
    """A bad prompt file or row; the message names the file, the row and the field."""


# --------------------------------------------------------------------------------------------- basics
def normalize_question(question: str) -> str:
    """Stripped, whitespace-collapsed, case-folded: the key for duplicates and ids."""
    return " ".join(question.split()).casefold()


def prompt_id(question: str) -> str:
    """Stable id: the first 16 hex characters of the sha1 of the normalised question."""
    return hashlib.sha1(normalize_question(question).encode("utf-8")).hexdigest()[:16]


def make_prompt(question: str, instruction: str) -> str:
    """What the model sees: the question followed by the answer-format instruction."""
    question = question.strip()
    if instruction and not instruction[0].isspace():
        instruction = " " + instruction
    return question + instruction


def answer_line(answer: str) -> str:
    return f"Answer: {answer}"


_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)


def _with_answer_line(text: str, answer: str) -> str:
    """``text`` with its last ``#### X`` line replaced by ``Answer: X`` (or one appended)."""
    text = text.rstrip()
    matches = list(_HASH_LINE.finditer(text))
    if matches:
        m = matches[-1]
        final = m.group(1).strip() or answer
        text = (text[: m.start()] + answer_line(final) + text[m.end():]).rstrip()
        return text
    last = text.splitlines()[-1].strip() if text else ""
    if last.startswith("Answer:"):
        return text
    return f"{text}\n{answer_line(answer)}" if text else answer_line(answer)


def split_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """``"<reasoning>\\n#### 1,234"`` -> (``"1234"``, reasoning with ``Answer: 1234``); None if no ``####``."""
    matches = list(_HASH_LINE.finditer(text))
    if not matches:
        idx = text.rfind("####")  # "#### X" not on its own line
        if idx < 0:
            return None
        final = text[idx + 4:].strip().replace(",", "").strip()
        reasoning = text[:idx].rstrip()
    else:
        m = matches[-1]
        final = m.group(1).replace(",", "").strip()
        reasoning = text[: m.start()].rstrip()
    solution = f"{reasoning}\n{answer_line(final)}" if reasoning else answer_line(final)
    return final, solution


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces handled), or None."""
    start = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        start = m.end()
    if start is None:
        return None
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):  # skip escaped characters such as \{ and \}
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None  # unbalanced


def dedup_prompts(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each normalised question; returns (rows, number removed)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        key = normalize_question(r["question"])
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out, len(rows) - len(out)


# --------------------------------------------------------------------------------------------- reasoning gym
def _rg_solution(task: str, item: dict) -> str:
    answer = str(item["answer"]).strip()
    meta = item.get("metadata") or {}
    if task in ("chain_sum", "basic_arithmetic") and meta.get("expression"):
        return f"{meta['expression']} = {answer}\n{answer_line(answer)}"
    cot = meta.get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        return _with_answer_line(cot, answer)
    return answer_line(answer)


def generate_reasoning_gym(task: str, config: dict, seed: int, n: int, *,
                           stats: dict | None = None) -> list[dict]:
    """``n`` unique problems of a reasoning-gym ``task``; the same arguments give the same rows.

    Datasets can repeat questions, so this generates more than ``n`` (doubling up to 64x) and
    keeps the first occurrence of each normalised question; if the task cannot give ``n`` unique
    questions it returns fewer. ``stats``, when given, receives ``generated`` and ``duplicates``.
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, list(DATASETS), n=3)
        hint = f"; did you mean {close}?" if close else f"; known tasks include {sorted(DATASETS)[:12]} ..."
        raise ValueError(f"prepare.reasoning_gym.task: unknown reasoning-gym task {task!r}{hint}")
    config = dict(config or {})
    for key in ("size", "seed"):
        if key in config:
            raise ValueError(f"prepare.reasoning_gym.config.{key}: set by the pipeline (use prepare.n_* "
                             "and prepare.reasoning_gym.seed), remove it from config")
    if n <= 0:
        return []

    size = n + max(8, n // 4)
    cap = 64 * n + 64
    while True:
        try:
            ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"prepare.reasoning_gym.config: invalid config for task {task!r}: {e}") from None
        rows: list[dict] = []
        seen: set[str] = set()
        dups = generated = 0
        for item in ds:
            generated += 1
            question = str(item["question"]).strip()
            key = normalize_question(question)
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            rows.append({
                "question": question,
                "answer": str(item["answer"]).strip(),
                "solution": _rg_solution(task, item),
                "source": f"reasoning_gym:{task}",
            })
            if len(rows) == n:
                break
        if len(rows) >= n or size >= cap:
            break
        size = min(cap, size * 2)
    if stats is not None:
        stats.update(generated=generated, duplicates=dups)
    return rows


# --------------------------------------------------------------------------------------------- files
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


def _parse_row(obj: dict, mapping: dict[str, str | None], preset: str | None) -> dict:
    """Validate one record; raises :class:`RowError` on the first problem."""
    qcol, acol = mapping["question"], mapping["answer"]
    scol, icol = mapping.get("solution"), mapping.get("id")

    if qcol not in obj:
        raise RowError(qcol, R_MISSING, f"field {_col_label('question', qcol)} is missing")
    q = obj[qcol]
    if not isinstance(q, str):
        raise RowError(qcol, R_TYPE, f"field {_col_label('question', qcol)} must be a string, "
                                      f"got {type(q).__name__} {q!r:.60}")
    if not q.strip():
        raise RowError(qcol, R_EMPTY_Q, f"field {_col_label('question', qcol)} is empty")

    if acol not in obj:
        raise RowError(acol, R_MISSING, f"field {_col_label('answer', acol)} is missing")
    a = obj[acol]
    solution: str | None = None
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        answer = _number_to_str(a)
        if answer is None:
            raise RowError(acol, R_TYPE, f"field {_col_label('answer', acol)} must be a finite number, got {a!r}")
    elif isinstance(a, str):
        if not a.strip():
            raise RowError(acol, R_EMPTY_A, f"field {_col_label('answer', acol)} is empty")
        if preset == "gsm8k":
            parsed = split_gsm8k_answer(a)
            if parsed is None:
                raise RowError(acol, R_MALFORMED, f"field {_col_label('answer', acol)} has no '#### <answer>' "
                                                   "line (preset gsm8k)")
            answer, solution = parsed
        elif preset == "math":
            boxed = last_boxed(a)
            if boxed is None:
                raise RowError(acol, R_MALFORMED, f"field {_col_label('answer', acol)} has no complete "
                                                   "\\boxed{...} answer (preset math)")
            answer = boxed
            solution = f"{a.rstrip()}\n{answer_line(boxed)}"
        else:
            answer = a.strip()
        if not answer:
            raise RowError(acol, R_EMPTY_A, f"field {_col_label('answer', acol)}: the final answer is empty")
    else:
        raise RowError(acol, R_TYPE, f"field {_col_label('answer', acol)} must be a string or a number, "
                                      f"got {type(a).__name__} {a!r:.60}")

    if scol and scol != acol and scol in obj:
        s = obj[scol]
        if s is not None and not isinstance(s, str):
            raise RowError(scol, R_TYPE, f"field {_col_label('solution', scol)} must be a string or null, "
                                          f"got {type(s).__name__} {s!r:.60}")
        if isinstance(s, str) and s.strip():
            solution = _with_answer_line(s, answer)

    row = {"question": q.strip(), "answer": answer, "solution": solution}
    if icol:
        if icol not in obj:
            raise RowError(icol, R_MISSING, f"field {_col_label('id', icol)} is missing")
        i = obj[icol]
        if isinstance(i, bool) or not isinstance(i, (str, int)) or (isinstance(i, str) and not i.strip()):
            raise RowError(icol, R_TYPE, f"field {_col_label('id', icol)} must be a non-empty string or an "
                                          f"integer, got {i!r:.60}")
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
    raise PromptFileError(f"{path}: cannot tell the format from the extension {ext!r}; set prepare.file.format "
                          "to jsonl or parquet")


def load_prompt_file(path: str | os.PathLike, *, format: Literal["auto", "jsonl", "parquet"], preset: str | None,
                     fields: dict[str, str | None] | None,
                     on_bad_rows: Literal["error", "quarantine"]) -> tuple[list[dict], list[dict]]:
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
    records = (jsonl_records(path, mapping.values()) if fmt == "jsonl"
               else parquet_records(path, PromptFileError))

    first_q: dict[str, str] = {}  # normalised question -> where
    first_id: dict[str, str] = {}
    source = f"file:{path.name}"

    def parse(obj: dict, where: str) -> dict:
        rec = _parse_row(obj, mapping, preset)
        key = normalize_question(rec["question"])
        if key in first_q:
            raise RowError(mapping["question"], R_DUP, f"duplicate question, first seen at {first_q[key]}")
        if "id" in rec and rec["id"] in first_id:
            raise RowError(mapping["id"], R_DUP_ID, f"duplicate id {rec['id']!r}, first seen at {first_id[rec['id']]}")
        first_q[key] = where
        if "id" in rec:
            first_id[rec["id"]] = where
        return {**rec, "source": source}

    good, bad = validate_rows(records, parse, file=path, on_bad_rows=on_bad_rows, error=PromptFileError)
    if not good:
        raise PromptFileError(no_good_rows(path, "prompt rows", bad))
    return good, bad


# --------------------------------------------------------------------------------------------- split
def split_prompts(rows: list[dict], n_train: int, n_test: int, n_warmup: int, seed: int) -> list[dict]:
    """Shuffle with ``random.Random(seed)`` and assign ``test``, then ``train``, then ``warmup``.

    Returns copies of the assigned rows with a ``split`` key; rows beyond the total are unused.
    """
    need = n_train + n_test + n_warmup
    if len(rows) < need:
        raise ValueError(f"prepare.n_train + prepare.n_test + prepare.n_warmup = {n_train} + {n_test} + "
                         f"{n_warmup} = {need} prompts requested, but only {len(rows)} unique prompt(s) are "
                         "available; lower these or supply more prompts")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out: list[dict] = []
    pos = 0
    for split, k in zip(SPLITS, (n_test, n_train, n_warmup)):
        for i in order[pos:pos + k]:
            out.append({**rows[i], "split": split})
        pos += k
    return out


# --------------------------------------------------------------------------------------------- stage helpers
def collect_prompts(prep: Any) -> tuple[list[dict], list[dict], dict]:
    """Rows from the source configured in ``prep`` (a :class:`pipeline.settings.prepare.PrepareParams`).

    Returns (unique rows, quarantine records, counts) with counts ``rows_read`` and
    ``duplicates_removed``.
    """
    need = prep.n_train + prep.n_test + prep.n_warmup
    if prep.source == "reasoning_gym":
        rg = prep.reasoning_gym
        stats: dict = {}
        rows = generate_reasoning_gym(rg.task, dict(rg.config), rg.seed, need, stats=stats)
        quarantine: list[dict] = []
        read, dups = stats.get("generated", len(rows)), stats.get("duplicates", 0)
    elif prep.source == "file":
        f = prep.file
        rows, quarantine = load_prompt_file(f.path, format=f.format, preset=f.preset, fields=dict(f.fields),
                                           on_bad_rows=prep.on_bad_rows)
        read = len(rows) + len(quarantine)
        dups = sum(q["reason"] == R_DUP for q in quarantine)
    else:
        raise ValueError(f"prepare.source: unknown source {prep.source!r}")
    rows, more = dedup_prompts(rows)  # a no-op for both sources; kept as a guard
    return rows, quarantine, {"rows_read": read, "duplicates_removed": dups + more}


def build_prompts_frame(rows: list[dict], instruction: str) -> pl.DataFrame:
    """The ``prompts`` table for rows carrying a ``split``."""
    return pl.DataFrame({
        "prompt_id": [r.get("id") or prompt_id(r["question"]) for r in rows],
        "split": [r["split"] for r in rows],
        "question": [r["question"] for r in rows],
        "prompt": [make_prompt(r["question"], instruction) for r in rows],
        "answer": [r["answer"] for r in rows],
        "solution": [r.get("solution") for r in rows],
        "source": [r["source"] for r in rows],
    }, schema={"prompt_id": pl.String, "split": pl.String, "question": pl.String, "prompt": pl.String,
               "answer": pl.String, "solution": pl.String, "source": pl.String})


def prepare_metrics(counts: dict, quarantine: list[dict], split_rows: list[dict], n_unique: int) -> dict:
    per_split = Counter(r["split"] for r in split_rows)
    return {
        "rows_read": counts["rows_read"],
        "quarantined": {"total": len(quarantine), "by_reason": dict(sorted(Counter(q["reason"]
                                                                                     for q in quarantine).items()))},
        "duplicates_removed": counts["duplicates_removed"],
        "unique_prompts": n_unique,
        "unused": n_unique - len(split_rows),
        "splits": {s: per_split.get(s, 0) for s in ("train", "test", "warmup")},
        "rows_written": len(split_rows),
    }
