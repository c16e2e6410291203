"""Pairs files in TRL's preference format: every layout TRL documents reads to the same pairs, and bad rows
are named by file, row and field, or quarantined and counted."""

from __future__ import annotations

import json

import polars as pl
import pytest

from pipeline.data import trl_format
from pipeline.model.encoding import encode_prompt, encode_response


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


Q = "What is 2 + 3?"
GOOD = {
    # conversational, explicit prompt (what our export writes)
    "conversational": {"prompt": [user(Q)], "chosen": [assistant("Answer: 5")], "rejected": [assistant("Answer: 6")]},
    # standard: plain strings
    "standard": {"prompt": Q, "chosen": "Answer: 5", "rejected": "Answer: 6"},
    # implicit prompt, UltraFeedback-binarised style: whole conversations, the prompt string, extra columns
    "ultrafeedback": {
        "prompt": Q,
        "prompt_id": "uf-1",
        "chosen": [user(Q), assistant("Answer: 5")],
        "rejected": [user(Q), assistant("Answer: 6")],
        "messages": [user(Q), assistant("Answer: 5")],
        "score_chosen": 8.5,
        "score_rejected": 3.0,
    },
    # implicit prompt without a prompt column (trl-lib/ultrafeedback_binarized)
    "implicit": {"chosen": [user(Q), assistant("Answer: 5")], "rejected": [user(Q), assistant("Answer: 6")]},
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("layout", list(GOOD))
def test_each_trl_layout_reads_to_the_same_pair(tmp_path, tokenizer, layout):
    rows, bad, read = trl_format.read_pairs_file(write_jsonl(tmp_path / "p.jsonl", [GOOD[layout]]), tokenizer, "error")
    assert (bad, read, len(rows)) == ([], 1, 1)
    r = rows[0]
    assert r["prompt"] == [user(Q)]
    assert (r["chosen_text"], r["rejected_text"]) == ("Answer: 5", "Answer: 6")
    # tokenized as our own pairs are: the chat template's user turn, responses ending with EOS
    assert r["prompt_ids"] == encode_prompt(tokenizer, Q)
    assert r["chosen_ids"] == encode_response(tokenizer, "Answer: 5")
    assert r["where"] == f"{tmp_path / 'p.jsonl'}: line 1"
    if layout == "ultrafeedback":
        assert (r["prompt_id"], r["score_chosen"], r["score_rejected"]) == ("uf-1", 8.5, 3.0)
    else:  # no ids in the file: from the content, the same for the same prompt in any layout
        conversational = write_jsonl(tmp_path / "c.jsonl", [GOOD["conversational"]])
        assert r["prompt_id"] == trl_format.read_pairs_file(conversational, tokenizer, "error")[0][0]["prompt_id"]
        assert r["score_chosen"] is None and r["scenario"] is None


def test_multi_turn_prompt_and_parquet(tmp_path, tokenizer):
    conv = [{"role": "system", "content": "Be terse."}, user("Hi"), assistant("Hello."), user(Q)]
    df = pl.DataFrame(
        [
            {"prompt": conv, "chosen": [assistant("5")], "rejected": [assistant("6")]},
            {"prompt": conv, "chosen": [assistant("five")], "rejected": [assistant("six")]},
        ]
    )
    df.write_parquet(tmp_path / "p.parquet")
    rows, _, _ = trl_format.read_pairs_file(tmp_path / "p.parquet", tokenizer, "error")
    assert [r["prompt"] for r in rows] == [conv, conv]
    assert rows[0]["prompt_ids"] == list(
        tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)["input_ids"]
    )
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"] and rows[0]["pair_id"] != rows[1]["pair_id"]
    assert rows[1]["where"].endswith("p.parquet: row 1 (0-based index)")


BAD = [  # (record or raw line, field, reason, words of the message)
    ({"prompt": Q, "rejected": "6"}, "chosen", "missing field", "is missing"),
    ({"prompt": Q, "chosen": 5, "rejected": "6"}, "rejected", "wrong type", "same kind as 'chosen'"),
    ({"prompt": Q, "chosen": "5", "rejected": "  "}, "rejected", trl_format.R_EMPTY, "is empty"),
    ({"prompt": [user(Q)], "chosen": "5", "rejected": "6"}, "prompt", "wrong type", "must be a string"),
    ({"prompt": Q, "chosen": " 5", "rejected": "5 "}, "rejected", trl_format.R_IDENTICAL, "same text"),
    (
        {"prompt": [user(Q)], "chosen": [{"role": "bot", "content": "5"}], "rejected": [assistant("6")]},
        "chosen",
        trl_format.R_MESSAGES,
        "role 'bot'",
    ),
    (
        {"prompt": [user(Q)], "chosen": [assistant("5"), assistant("again")], "rejected": [assistant("6")]},
        "chosen",
        trl_format.R_MESSAGES,
        "one assistant message",
    ),
    (
        {"prompt": [user(Q), assistant("ok")], "chosen": [assistant("5")], "rejected": [assistant("6")]},
        "prompt",
        trl_format.R_MESSAGES,
        "end with a user turn",
    ),
    (
        {"prompt": [user(Q)], "chosen": [{"role": "assistant", "content": 5}], "rejected": [assistant("6")]},
        "chosen",
        "wrong type",
        "content must be a string",
    ),
    (
        {"prompt": "Another question", "chosen": [user(Q), assistant("5")], "rejected": [user(Q), assistant("6")]},
        "prompt",
        trl_format.R_VALUE,
        "not the last user turn",
    ),
    ({"prompt": Q, "chosen": "5", "rejected": "6", "scenario": 7}, "scenario", "wrong type", "an integer 0-4"),
    ({"prompt": Q, "chosen": "5", "rejected": "6", "score_chosen": "high"}, "score_chosen", "wrong type", "number"),
    (
        {"prompt": Q, "chosen": "5", "rejected": "6", "chosen_token_ids": [1, 2]},
        "chosen_token_ids",
        trl_format.R_IDS,
        "does not decode to the text",
    ),
    ('{"prompt": "x", "chosen": ', "(whole line)", "invalid json", "not valid JSON"),
]


@pytest.mark.parametrize("record,field,reason,words", BAD, ids=[b[2] + ":" + b[1] for b in BAD])
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, tokenizer, record, field, reason, words):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD["standard"], record])
    with pytest.raises(trl_format.PairsFileError) as e:
        trl_format.read_pairs_file(path, tokenizer, "error")
    assert str(e.value).startswith(f"{path}: line 2, field '{field}': ") and words in str(e.value)
    good, bad, read = trl_format.read_pairs_file(path, tokenizer, "quarantine")
    assert (len(good), read) == (1, 2)
    assert [(q["file"], q["row"], q["field"], q["reason"]) for q in bad] == [(str(path), 2, field, reason)]
    assert bad[0]["message"] == str(e.value)


def test_quarantine_counts_and_cross_row_checks(tmp_path, tokenizer):
    a, b = GOOD["standard"], {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            a,
            {**b, "pair_id": "x"},
            "",
            {**a, "chosen": "five", "pair_id": "x"},  # a blank line is no row
            a,  # the same pair again
            {**b, "prompt_id": "q1"},
            {**a, "chosen": "five", "prompt_id": "q1"},  # one prompt_id, two prompts
        ],
    )
    good, bad, read = trl_format.read_pairs_file(path, tokenizer, "quarantine")
    assert read == 6 and len(good) == 3
    assert [(q["row"], q["field"], q["reason"]) for q in bad] == [
        (4, "pair_id", trl_format.R_DUP),
        (5, "(whole line)", trl_format.R_DUP),
        (7, "prompt_id", trl_format.R_PROMPT_ID),
    ]
    assert "first seen at" in bad[0]["message"] and f"{path}: line 1" in bad[1]["message"]


def test_no_valid_row_and_bad_paths_fail_in_both_modes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": Q, "chosen": "5"}])
    for mode in ("error", "quarantine"):
        with pytest.raises(trl_format.PairsFileError, match="line 1, field 'rejected'"):
            trl_format.read_pairs_file(path, tokenizer, mode)
    with pytest.raises(trl_format.PairsFileError, match="not found .check pairs.source"):
        trl_format.read_pairs_file(tmp_path / "nope.jsonl", tokenizer, "error")
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(trl_format.PairsFileError, match="extension '.csv'"):
        trl_format.read_pairs_file(tmp_path / "p.csv", tokenizer, "error")
    (tmp_path / "empty").mkdir()
    with pytest.raises(trl_format.PairsFileError, match="holds no pairs file"):
        trl_format.read_pairs_file(tmp_path / "empty", tokenizer, "error")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(trl_format.PairsFileError, match="cannot read as Parquet"):
        trl_format.read_pairs_file(tmp_path / "bad.parquet", tokenizer, "error")
