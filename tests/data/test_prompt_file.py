"""pipeline/data/prompt_file.py: a user's prompt file read and validated, with presets, field mapping and bad
rows refused or quarantined."""

from __future__ import annotations

import json

import polars as pl
import pytest

from pipeline.data.prompt_file import R_DUP, R_EMPTY_A, R_EMPTY_Q, PromptFileError, load_prompt_file
from pipeline.data.rows import R_JSON, R_MISSING, R_TYPE, R_UTF8, WHOLE_LINE


def load(path, format="auto", preset=None, fields=None, on_bad_rows="error"):
    """The loader with the file options this test file varies (the rest as a plain file needs)."""
    return load_prompt_file(path, format=format, preset=preset, fields=fields, on_bad_rows=on_bad_rows)


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def good_objs(n=3):
    return [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


def test_jsonl_and_parquet_with_field_mapping(tmp_path):
    objs = [{"q": f"Problem {i}?", "a": i * 2, "why": f"Because {i}*2.", "uid": f"p{i}"} for i in range(4)]
    objs[1]["a"] = 2.5
    fields = {"question": "q", "answer": "a", "solution": "why", "id": "uid"}
    jl = write_jsonl(tmp_path / "in.jsonl", objs)
    pq = tmp_path / "in.parquet"
    pl.DataFrame(
        {
            "q": [o["q"] for o in objs],
            "a": [str(o["a"]) for o in objs],
            "why": [o["why"] for o in objs],
            "uid": [o["uid"] for o in objs],
        }
    ).write_parquet(pq)
    for path in (jl, pq):
        good, bad = load(path, fields=fields)
        assert bad == []
        assert [r["question"] for r in good] == [o["q"] for o in objs]
        assert [r["id"] for r in good] == ["p0", "p1", "p2", "p3"]
        assert good[0]["solution"] == "Because 0*2.\nAnswer: 0"
        assert good[0]["source"] == f"file:{path.name}"
    good, _ = load(jl, fields=fields)
    assert [r["answer"] for r in good] == ["0", "2.5", "4", "6"]  # JSON numbers become strings

    # no preset, no mapping: question / answer, solution optional
    plain = write_jsonl(tmp_path / "plain.jsonl", good_objs(2))
    good, _ = load(plain)
    assert good[0] == {"question": "What is 0 + 1?", "answer": "1", "solution": None, "source": "file:plain.jsonl"}


def test_gsm8k_preset(tmp_path):
    objs = [
        {
            "question": "Tom has 1,000 apples and buys 234. How many?",
            "answer": "He has 1000 + 234 = <<1000+234=1234>>1234 apples.\n#### 1,234",
        },
        {"question": "Two?", "answer": "One plus one.\n#### 2"},
    ]
    good, _ = load(write_jsonl(tmp_path / "gsm.jsonl", objs), preset="gsm8k")
    assert good[0]["answer"] == "1234"
    assert good[0]["solution"] == "He has 1000 + 234 = <<1000+234=1234>>1234 apples.\nAnswer: 1234"
    assert good[1]["answer"] == "2"

    bad = write_jsonl(tmp_path / "gsm_bad.jsonl", [{"question": "x?", "answer": "no final line"}])
    with pytest.raises(PromptFileError, match=r"gsm_bad\.jsonl: line 1, field 'answer'.*####"):
        load(bad, preset="gsm8k")


def test_math_preset(tmp_path):
    objs = [
        {"problem": "Simplify.", "solution": r"We get $\boxed{1}$ first, then $\boxed{\frac{1}{\sqrt{2}}}$."},
        {"problem": "Other.", "solution": r"So $x = \boxed{\{1, 2\}}$"},
    ]
    good, _ = load(write_jsonl(tmp_path / "math.jsonl", objs), preset="math")
    assert good[0]["question"] == "Simplify."
    assert good[0]["answer"] == r"\frac{1}{\sqrt{2}}"
    assert good[0]["solution"] == objs[0]["solution"] + "\nAnswer: " + r"\frac{1}{\sqrt{2}}"
    assert good[1]["answer"] == r"\{1, 2\}"
    # fields override the preset's defaults
    renamed = [{"prob": "Q?", "solution": r"\boxed{3}"}]
    good, _ = load(write_jsonl(tmp_path / "m2.jsonl", renamed), preset="math", fields={"question": "prob"})
    assert good[0]["answer"] == "3"


BAD_CASES = {
    # name: (line 3 content as bytes, field, reason)
    "missing": (json.dumps({"question": "Q3?"}).encode(), "answer", R_MISSING),
    "wrong_type": (json.dumps({"question": "Q3?", "answer": [1, 2]}).encode(), "answer", R_TYPE),
    "wrong_type_bool": (json.dumps({"question": "Q3?", "answer": True}).encode(), "answer", R_TYPE),
    "empty_prompt": (json.dumps({"question": "   \t ", "answer": "1"}).encode(), "question", R_EMPTY_Q),
    "empty_answer": (json.dumps({"question": "Q3?", "answer": "  "}).encode(), "answer", R_EMPTY_A),
    "duplicate": (json.dumps({"question": "  what IS 0   + 1? ", "answer": "1"}).encode(), "question", R_DUP),
    "utf8": (b'{"question": "Caf\xe9 \xff?", "answer": "1"}', "question", R_UTF8),
    "bad_json": (b'{"question": "Q3?", "answer": ', WHOLE_LINE, R_JSON),
}


def _bad_file(tmp_path, line: bytes):
    path = tmp_path / "prompts_in.jsonl"
    head = b"".join(json.dumps(o).encode() + b"\n" for o in good_objs(2))
    tail = b"".join(json.dumps(o).encode() + b"\n" for o in good_objs(5)[2:])
    path.write_bytes(head + line + b"\n" + tail)
    return path


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_rows_error_mode(tmp_path, case):
    line, field, _ = BAD_CASES[case]
    path = _bad_file(tmp_path, line)
    with pytest.raises(PromptFileError) as ei:
        load(path)
    msg = str(ei.value)
    assert "prompts_in.jsonl" in msg
    assert "line 3" in msg
    assert f"field '{field}'" in msg
    if case == "duplicate":
        assert "first seen at line 1" in msg


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_rows_quarantine_mode(tmp_path, case):
    line, field, reason = BAD_CASES[case]
    path = _bad_file(tmp_path, line)
    good, bad = load(path, on_bad_rows="quarantine")
    assert len(good) == 5
    assert len(bad) == 1
    q = bad[0]
    assert (q["file"], q["row"], q["field"], q["reason"]) == (str(path), 3, field, reason)
    assert q["raw"] == line.decode("utf-8", errors="replace")


def test_parquet_bad_row_names_zero_based_row(tmp_path):
    path = tmp_path / "p.parquet"
    pl.DataFrame({"question": ["A?", "B?", ""], "answer": ["1", "2", "3"]}).write_parquet(path)
    with pytest.raises(PromptFileError, match=r"p\.parquet: row 2 \(0-based index\), field 'question'"):
        load(path)
    good, bad = load(path, on_bad_rows="quarantine")
    assert len(good) == 2 and bad[0]["row"] == 2 and bad[0]["reason"] == R_EMPTY_Q


def test_nothing_valid_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"question": "Q"}, {"answer": "1"}])
    for mode in ("error", "quarantine"):
        with pytest.raises(PromptFileError, match="all_bad.jsonl"):
            load(path, on_bad_rows=mode)
    with pytest.raises(PromptFileError, match=r"nope\.jsonl.*prepare\.file\.path"):
        load(tmp_path / "nope.jsonl")
