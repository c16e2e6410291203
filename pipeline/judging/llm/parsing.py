"""Strict parsing of the judge's answers, and the JSON schemas asked for.

A JSON schema is requested (``response_format``); plain text is parsed by a tolerant fallback (JSON
anywhere in the text, or ``score: 4``). A score outside 1-5, a missing field or prose without a
score is a :class:`ParseError`: the caller asks again and finally counts a failure, never a score.
"""

from __future__ import annotations

import json
import re
from typing import Any


class ParseError(ValueError):
    """A malformed judge answer."""


_JSON_OBJ_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_RE = re.compile(r"\bscore\b\W{0,4}(?:is|of)?\W{0,4}?(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_NUMBER_RE = re.compile(r"\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*\.?\s*")


def _json_object(text: str) -> dict | None:
    """The answer as a JSON object: the whole text, a fenced block, or the first ``{...}`` in it."""
    t = text.strip()
    if t.startswith("```"):
        t = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", t)
    for cand in (t, *(m.group(0) for m in _JSON_OBJ_RE.finditer(text))):
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _as_int(v: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or v is None:
        raise ParseError(f"{what}: not a number")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ParseError(f"{what}: not a number") from None
    if not isinstance(v, (int, float)) or v != int(v):
        raise ParseError(f"{what}: not an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise ParseError(f"{what}: {v} out of range {lo}-{hi}")
    return v


def parse_rubric(text: str | None) -> dict[str, int]:
    """``{"score": 1..5}`` from a JSON answer or, failing that, ``score: 4`` or a lone number."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    obj = _json_object(text)
    if obj is not None:
        if "score" not in obj:
            raise ParseError("no 'score' field")
        return {"score": _as_int(obj["score"], 1, 5, "score")}
    m = _BARE_NUMBER_RE.fullmatch(text) or _SCORE_RE.search(text)
    if m is None:
        raise ParseError("no score in the answer")
    return {"score": _as_int(m.group(1), 1, 5, "score")}


_BEST_RE = re.compile(r"\bbest\b\W{0,3}(?:response\s*)?(?:is\s*)?#?(\d+)", re.IGNORECASE)
_WORST_RE = re.compile(r"\bworst\b\W{0,3}(?:response\s*)?(?:is\s*)?#?(\d+)", re.IGNORECASE)


def parse_listwise(text: str | None, n: int) -> dict[str, Any]:
    """``{"best": k, "worst": m, "all_equal": bool}`` with 1 <= k, m <= n and k != m unless all equal."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    obj = _json_object(text)
    if obj is None:
        b, w = _BEST_RE.search(text), _WORST_RE.search(text)
        if b is None or w is None:
            raise ParseError("no best/worst in the answer")
        obj = {"best": b.group(1), "worst": w.group(1), "all_equal": False}
    all_equal = obj.get("all_equal", False)
    if not isinstance(all_equal, bool):
        raise ParseError("all_equal: not a boolean")
    if "best" not in obj or "worst" not in obj:
        if all_equal:
            return {"best": None, "worst": None, "all_equal": True}
        raise ParseError("no 'best'/'worst' field")
    best, worst = _as_int(obj["best"], 1, n, "best"), _as_int(obj["worst"], 1, n, "worst")
    if best == worst and not all_equal:
        raise ParseError("best and worst are the same response")
    return {"best": best, "worst": worst, "all_equal": all_equal}


def rubric_format() -> dict:
    """The ``response_format`` of a rubric request: ``{"score": 1..5}``."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "rubric_score",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
                "required": ["score"],
                "additionalProperties": False,
            },
        },
    }


def listwise_format(n: int) -> dict:
    """The ``response_format`` of a listwise request over ``n`` shown responses."""
    pos = {"type": "integer", "enum": list(range(1, n + 1))}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "best_worst",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"best": pos, "worst": pos, "all_equal": {"type": "boolean"}},
                "required": ["best", "worst", "all_equal"],
                "additionalProperties": False,
            },
        },
    }
