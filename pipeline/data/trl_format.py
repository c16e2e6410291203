"""Preference pairs in TRL's dataset format (https://huggingface.co/docs/trl/dataset_formats), out and in.

Out (:func:`export_frame`, :func:`write_export`): TRL's *conversational preference* format, ``prompt`` a
list of ``{role, content}`` messages ending with the user's turn and ``chosen`` / ``rejected`` one
assistant message each, with our tags as extra columns (TRL's trainers drop the columns they do not
use). One file per split, ``train`` and ``test`` (our held-out pairs), as JSONL and as Parquet in a
folder each: the layout ``datasets.load_dataset(<folder>)`` reads into a ``DatasetDict``.

In (:func:`read_pairs_file`): a JSONL or Parquet file, or a folder of them, in TRL's preference format:
conversational or standard (plain strings, read as one user turn and the answer), with an explicit
``prompt`` or an implicit one (``chosen`` and ``rejected`` whole conversations that share it, as in
UltraFeedback-binarised sets, whose ``prompt`` string, when present, must be that shared prompt's last
user turn). Other columns are ignored except ``prompt_id``, ``pair_id``, our tags (:data:`CARRIED`) and
the token ids of our own export (used when they decode to the text, else the row is bad). Bad rows are
never dropped silently: they raise :class:`PairsFileError` or come back as quarantine records naming
the file, the row and the field, as prompt files' rows do (both read through :mod:`pipeline.data.rows`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import paths
from pipeline.data.rows import (
    R_MISSING,
    R_TYPE,
    WHOLE_LINE,
    OnBadRows,
    Record,
    RowError,
    check_on_bad_rows,
    jsonl_records,
    no_good_rows,
    parquet_records,
    validate_rows,
)
from pipeline.io import atomic_dir, canonical_json
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.schema import conform

JUDGED = "judged"  # pairs.source of pairs built from the judge's picks
CONSTRUCTED = "constructed"  # pairs.source of correct responses and controlled edits of them (data/edits.py)
IMPORTED = "imported"  # chosen_source / rejected_source of imported pairs whose file does not say
SCENARIO_IMPORTED = 0  # scenario of imported pairs whose file does not say (1-4: the paper's, tagging)
SPLIT_FILES = {"train": "train", "heldout": "test"}  # our split -> the file (Hugging Face split) name
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
ROLES = ("system", "user", "assistant")

# Short, countable reasons for quarantine records (missing field, wrong type: prompts' own).
R_EMPTY = "empty field"
R_MESSAGES = "bad messages"
R_IDENTICAL = "chosen equals rejected"
R_DUP = "duplicate pair"
R_PROMPT_ID = "prompt_id reused"
R_IDS = "token ids do not match text"
R_VALUE = "bad value"


def judged_inputs() -> list[str]:
    """``pairs.inputs`` when ``pairs.source`` is ``judged`` or ``constructed``: the candidates and the judge's
    picks and scores."""
    return [paths.CANDIDATES, paths.CANDIDATES_OTHER, str(Path(paths.SCORES).parent)]


class PairsFileError(ValueError):
    """A bad pairs file or row; the message names the file, the row and the field."""


# Tags a file may carry (our export does): column -> check of a non-null value. Absent or null: unknown.
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_name(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


CARRIED = {
    "scenario": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4, "an integer 0-4"),
    "chosen_source": (_is_name, "a non-empty string"),
    "rejected_source": (_is_name, "a non-empty string"),
    "chosen_correct": (lambda v: isinstance(v, bool), "true, false or null"),
    "rejected_correct": (lambda v: isinstance(v, bool), "true, false or null"),
    "chosen_sampler_logprob": (_is_number, "a finite number or null"),
    "rejected_sampler_logprob": (_is_number, "a finite number or null"),
    "score_chosen": (_is_number, "a finite number or null"),
    "score_rejected": (_is_number, "a finite number or null"),
}
TOKEN_IDS = {"chosen": "chosen_token_ids", "rejected": "rejected_token_ids"}


# --------------------------------------------------------------------------------------------- rows
def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(
            field,
            R_TYPE,
            f"field '{field}' must be a string or a list of messages, got {type(value).__name__} {value!r:.60}",
        )
    if not value:
        raise RowError(field, R_EMPTY, f"field '{field}' is an empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(
                field,
                R_MESSAGES,
                f"field '{field}', message {i}: must be an object with 'role' and 'content', got {m!r:.60}",
            )
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowError(field, R_MESSAGES, f"field '{field}', message {i}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise RowError(
                field,
                R_TYPE,
                f"field '{field}', message {i}: content must be a string, got {type(content).__name__} {content!r:.60}",
            )
        if role != "system" and not content.strip():
            raise RowError(field, R_EMPTY, f"field '{field}', message {i}: empty {role} content")
        out.append({"role": role, "content": content})
    return out


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(
            field,
            R_TYPE,
            f"field '{field}' must be a string like the other fields, got {type(value).__name__} {value!r:.60}",
        )
    if not value.strip():
        raise RowError(field, R_EMPTY, f"field '{field}' is empty")
    return value


def split_conversation(obj: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) of one record in any of TRL's preference layouts."""
    for f in ("chosen", "rejected"):
        if obj.get(f) is None:
            raise RowError(f, R_MISSING, f"field '{f}' is missing")
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError(
            "rejected",
            R_TYPE,
            f"field 'rejected' must be of the same kind as 'chosen' (a string or a "
            f"list of messages), got {type(rejected).__name__} {rejected!r:.60}",
        )
    if isinstance(chosen, str):  # standard format: the prompt is one user turn
        if prompt is None:
            raise RowError("prompt", R_MISSING, "field 'prompt' is missing (needed when chosen is a string)")
        return (
            [{"role": "user", "content": _text(prompt, "prompt")}],
            _text(chosen, "chosen"),
            _text(rejected, "rejected"),
        )
    cm, rm = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if isinstance(prompt, list):
        pm = _messages(prompt, "prompt")
    elif prompt is None or isinstance(prompt, str):  # implicit prompt: what chosen and rejected share
        k = 0
        while k < min(len(cm), len(rm)) - 1 and cm[k] == rm[k]:
            k += 1
        pm, cm, rm = cm[:k], cm[k:], rm[k:]
        if isinstance(prompt, str) and prompt.strip():
            if not pm:
                pm = [{"role": "user", "content": prompt}]
            elif pm[-1]["content"].strip() != prompt.strip():
                raise RowError(
                    "prompt",
                    R_VALUE,
                    f"field 'prompt' {prompt!r:.40} is not the last user turn "
                    f"{pm[-1]['content']!r:.40} of the conversation in chosen/rejected",
                )
        elif not pm:
            raise RowError("prompt", R_MISSING, "field 'prompt' is missing and chosen/rejected share no prompt turns")
    else:
        raise RowError(
            "prompt",
            R_TYPE,
            f"field 'prompt' must be a list of messages like chosen and rejected, got "
            f"{type(prompt).__name__} {prompt!r:.60}",
        )
    if pm[-1]["role"] != "user":
        raise RowError("prompt", R_MESSAGES, f"the prompt must end with a user turn, its last is {pm[-1]['role']!r}")
    for f, side in (("chosen", cm), ("rejected", rm)):
        if len(side) != 1 or side[0]["role"] != "assistant":
            raise RowError(
                f,
                R_MESSAGES,
                f"field '{f}' must hold one assistant message after the prompt, got roles {[m['role'] for m in side]}",
            )
    return pm, cm[0]["content"], rm[0]["content"]


def _identifier(obj: dict, field: str) -> str | None:
    v = obj.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        raise RowError(field, R_TYPE, f"field '{field}' must be a non-empty string or an integer, got {v!r:.60}")
    return str(v).strip()


def _token_ids(obj: dict, field: str, text: str, tokenizer) -> list[int]:
    """The file's token ids when it has them (our export: what was sampled), else ``text`` tokenized."""
    ids = obj.get(field)
    if ids is None:
        return encode_response(tokenizer, text)
    if (
        not isinstance(ids, list)
        or not ids
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokenizer) for i in ids)
    ):
        raise RowError(
            field,
            R_TYPE,
            f"field '{field}' must be a non-empty list of token ids below the tokenizer's "
            f"{len(tokenizer)}, got {ids!r:.60}",
        )
    if tokenizer.decode(ids, skip_special_tokens=True).strip() != text.strip():
        raise RowError(
            field,
            R_IDS,
            f"field '{field}' does not decode to the text with the policy's tokenizer "
            "(made with another tokenizer? drop the column to tokenize the text)",
        )
    return list(ids)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt token ids of a conversation, as :func:`encode_prompt` gives them for a single user turn."""
    if len(messages) == 1:
        return encode_prompt(tokenizer, messages[0]["content"])
    if not getattr(tokenizer, "chat_template", None):
        raise RowError(
            "prompt",
            R_MESSAGES,
            "a prompt of several messages needs a chat template, and the policy's tokenizer has none",
        )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


def parse_row(obj: dict, tokenizer) -> dict:
    """One validated pair: prompt messages, texts, token ids, ids and carried tags; raises ``RowError``."""
    prompt, chosen, rejected = split_conversation(obj)
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", R_IDENTICAL, "fields 'chosen' and 'rejected' hold the same text")
    row: dict[str, Any] = {"prompt": prompt, "chosen_text": chosen, "rejected_text": rejected}
    for col, (ok, what) in CARRIED.items():
        v = obj.get(col)
        if v is not None and not ok(v):
            raise RowError(col, R_TYPE, f"field '{col}' must be {what}, got {v!r:.60}")
        row[col] = v
    row["prompt_ids"] = encode_messages(tokenizer, prompt)
    row["chosen_ids"] = _token_ids(obj, TOKEN_IDS["chosen"], chosen, tokenizer)
    row["rejected_ids"] = _token_ids(obj, TOKEN_IDS["rejected"], rejected, tokenizer)
    if row["chosen_ids"] == row["rejected_ids"]:
        raise RowError("rejected", R_IDENTICAL, "fields 'chosen' and 'rejected' tokenize alike")
    row["prompt_id"] = _identifier(obj, "prompt_id") or hashlib.sha1(canonical_json(prompt).encode()).hexdigest()[:16]
    row["pair_id"] = _identifier(obj, "pair_id") or (
        f"{row['prompt_id']}-{hashlib.sha1(canonical_json([chosen, rejected]).encode()).hexdigest()[:8]}"
    )
    return row


# --------------------------------------------------------------------------------------------- files
def pairs_files(path: str | os.PathLike) -> list[Path]:
    """The file, or a folder's pairs files (by name); a path that is neither raises naming pairs.source."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise PairsFileError(f"{path}: folder holds no pairs file ({', '.join(SUFFIXES)}) (check pairs.source)")
        return files
    if not path.is_file():
        raise PairsFileError(f"{path}: pairs file not found (check pairs.source)")
    if path.suffix.lower() not in SUFFIXES:
        raise PairsFileError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; pairs files are {', '.join(SUFFIXES)}"
        )
    return [path]


def _records(path: Path) -> Iterable[Record]:
    if SUFFIXES[path.suffix.lower()] == "jsonl":
        return jsonl_records(path, ("prompt", "chosen", "rejected"))
    return parquet_records(path, PairsFileError)


def read_pairs_file(path: str | os.PathLike, tokenizer, on_bad_rows: OnBadRows) -> tuple[list[dict], list[dict], int]:
    """Read and validate pairs; returns (good rows, quarantine records, rows read).

    Good rows are :func:`parse_row`'s plus ``where`` (file and row). Quarantine records and the
    ``on_bad_rows`` rule are those of prompt files (:func:`pipeline.data.rows.validate_rows`); no good
    row left raises :class:`PairsFileError` in both modes. Besides each row's own checks: a ``pair_id``
    seen before, and a ``prompt_id`` seen before with another prompt, make the later row bad.
    """
    check_on_bad_rows(on_bad_rows, "pairs.on_bad_rows", PairsFileError)
    good: list[dict] = []
    bad: list[dict] = []
    first_pair: dict[str, str] = {}
    first_prompt: dict[str, tuple[list, str]] = {}
    for file in pairs_files(path):

        def parse(obj: dict, where: str, file: Path = file) -> dict:
            at = f"{file}: {where}"
            rec = parse_row(obj, tokenizer)
            if rec["pair_id"] in first_pair:
                raise RowError(
                    "pair_id" if "pair_id" in obj else WHOLE_LINE,
                    R_DUP,
                    f"pair {rec['pair_id']!r} again, first seen at {first_pair[rec['pair_id']]}",
                )
            seen = first_prompt.get(rec["prompt_id"])
            if seen is not None and seen[0] != rec["prompt"]:
                raise RowError(
                    "prompt_id", R_PROMPT_ID, f"prompt_id {rec['prompt_id']!r} names another prompt at {seen[1]}"
                )
            first_pair[rec["pair_id"]] = at
            first_prompt.setdefault(rec["prompt_id"], (rec["prompt"], at))
            return {**rec, "where": at}

        g, b = validate_rows(_records(file), parse, file=file, on_bad_rows=on_bad_rows, error=PairsFileError)
        good += g
        bad += b
    if not good:
        raise PairsFileError(no_good_rows(path, "pairs", bad))
    return good, bad, len(good) + len(bad)


# --------------------------------------------------------------------------------------------- export
def export_frame(
    pairs: pl.DataFrame, prompts: dict[str, list[dict]], scores: dict[str, tuple[float | None, float | None]]
) -> pl.DataFrame:
    """The ``pairs_trl`` table: ``pairs`` in TRL's conversational format, ``prompts`` giving each
    prompt_id's messages and ``scores`` each pair_id's judge scores (absent: null)."""

    def msg(role, text):
        return [{"role": role, "content": text}]

    none = (None, None)
    return conform(
        pairs.with_columns(
            prompt=pl.Series([prompts[p] for p in pairs["prompt_id"]]),
            chosen=pl.Series([msg("assistant", t) for t in pairs["chosen_text"]]),
            rejected=pl.Series([msg("assistant", t) for t in pairs["rejected_text"]]),
            score_chosen=pl.Series([scores.get(p, none)[0] for p in pairs["pair_id"]], dtype=pl.Float64),
            score_rejected=pl.Series([scores.get(p, none)[1] for p in pairs["pair_id"]], dtype=pl.Float64),
            chosen_token_ids=pairs["chosen_ids"],
            rejected_token_ids=pairs["rejected_ids"],
        ),
        "pairs_trl",
        where="TRL export",
    )


def write_export(frame: pl.DataFrame, splits: pl.Series, out_dir: str | os.PathLike) -> dict[str, int]:
    """``<out_dir>/jsonl/<split>.jsonl`` and ``<out_dir>/parquet/<split>.parquet`` per non-empty split
    (train, test), replacing the folder at once; returns the rows per file split."""
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for ours, name in SPLIT_FILES.items():
            part = frame.filter(splits == ours)
            counts[name] = len(part)
            if not len(part):
                continue  # an empty file is not a split load_dataset can read
            for fmt, write in (("jsonl", part.write_ndjson), ("parquet", part.write_parquet)):
                (tmp / fmt).mkdir(exist_ok=True)
                write(tmp / fmt / f"{name}.{fmt}")
    return counts
