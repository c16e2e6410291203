"""The prompt sets of the prepare stage: rows from the configured source (:func:`collect_prompts`: a
reasoning-gym task, :mod:`pipeline.data.reasoning_gym_prompts`, or a prompt file,
:mod:`pipeline.data.prompt_file`), deduplicated, split into test / train / warmup and validation
(:func:`split_prompts`), and the ``prompts`` table (:func:`build_prompts_frame`) and its metrics
(:func:`prepare_metrics`).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import polars as pl

from pipeline.data.prompt_file import R_DUP, load_prompt_file
from pipeline.data.prompt_text import make_prompt, normalize_question, prompt_id
from pipeline.data.reasoning_gym_prompts import generate_reasoning_gym

SPLITS = ("test", "train", "warmup")  # assignment order of the shuffled rows before the validation prompts
VAL = "val"


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


def collect_prompts(prep: Any) -> tuple[list[dict], list[dict], dict]:
    """Rows from the source configured in ``prep`` (a :class:`pipeline.settings.prepare.PrepareParams`).

    Returns (unique rows, quarantine records, counts) with counts ``rows_read`` and
    ``duplicates_removed``.
    """
    need = prep.n_train + prep.n_test + prep.n_warmup + prep.n_val
    if prep.source == "reasoning_gym":
        rg = prep.reasoning_gym
        stats: dict = {}
        rows = generate_reasoning_gym(rg.task, dict(rg.config), rg.seed, need, stats=stats)
        quarantine: list[dict] = []
        read, dups = stats.get("generated", len(rows)), stats.get("duplicates", 0)
    elif prep.source == "file":
        f = prep.file
        rows, quarantine = load_prompt_file(
            f.path, format=f.format, preset=f.preset, fields=dict(f.fields), on_bad_rows=prep.on_bad_rows
        )
        read = len(rows) + len(quarantine)
        dups = sum(q["reason"] == R_DUP for q in quarantine)
    else:
        raise ValueError(f"prepare.source: unknown source {prep.source!r}")
    rows, more = dedup_prompts(rows)  # both sources drop duplicates already: a guard for unique prompt ids
    return rows, quarantine, {"rows_read": read, "duplicates_removed": dups + more}


def split_prompts(rows: list[dict], n_train: int, n_test: int, n_warmup: int, n_val: int, seed: int) -> list[dict]:
    """The last ``n_val`` rows are the validation prompts (``val``); the rows before them are shuffled with
    ``random.Random(seed)`` and assigned ``test``, then ``train``, then ``warmup``.

    With ``n_val`` 0 the splits are those of a pipeline without validation prompts. The validation prompts
    come from the end so that, for a reasoning-gym task (which generates the same rows first whatever the
    count), the other splits do not depend on ``n_val``: the rows before the last ``n_val`` are the rows of a
    run without them, shuffled alike. For a prompt file they are the file's last unique rows. Returns copies
    of the assigned rows with a ``split`` key; rows beyond the total are unused."""
    need = n_train + n_test + n_warmup + n_val
    if len(rows) < need:
        raise ValueError(
            f"prepare.n_train + prepare.n_test + prepare.n_warmup + prepare.n_val = {n_train} + {n_test} + "
            f"{n_warmup} + {n_val} = {need} prompts requested, but only {len(rows)} unique prompt(s) are "
            "available; lower these or supply more prompts"
        )
    pool = len(rows) - n_val
    order = list(range(pool))
    random.Random(seed).shuffle(order)
    out: list[dict] = []
    pos = 0
    for split, k in zip(SPLITS, (n_test, n_train, n_warmup)):
        for i in order[pos : pos + k]:
            out.append({**rows[i], "split": split})
        pos += k
    out += [{**r, "split": VAL} for r in rows[pool:]]
    return out


def build_prompts_frame(rows: list[dict], instruction: str) -> pl.DataFrame:
    """The ``prompts`` table for rows carrying a ``split``."""
    return pl.DataFrame(
        {
            "prompt_id": [r.get("id") or prompt_id(r["question"]) for r in rows],
            "split": [r["split"] for r in rows],
            "question": [r["question"] for r in rows],
            "prompt": [make_prompt(r["question"], instruction) for r in rows],
            "answer": [r["answer"] for r in rows],
            "solution": [r.get("solution") for r in rows],
            "source": [r["source"] for r in rows],
        },
        schema={
            "prompt_id": pl.String,
            "split": pl.String,
            "question": pl.String,
            "prompt": pl.String,
            "answer": pl.String,
            "solution": pl.String,
            "source": pl.String,
        },
    )


def prepare_metrics(counts: dict, quarantine: list[dict], split_rows: list[dict], n_unique: int) -> dict:
    """metrics/prepare.json: rows read, quarantined (by reason), duplicates removed, and prompts per split."""
    per_split = Counter(r["split"] for r in split_rows)
    return {
        "rows_read": counts["rows_read"],
        "quarantined": {
            "total": len(quarantine),
            "by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        },
        "duplicates_removed": counts["duplicates_removed"],
        "unique_prompts": n_unique,
        "unused": n_unique - len(split_rows),
        "splits": {s: per_split.get(s, 0) for s in ("train", "test", "warmup", VAL)},
        "rows_written": len(split_rows),
    }
