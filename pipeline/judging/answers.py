"""Final answers of math responses: extraction, normalisation and comparison with the gold answer.

A leaf module (standard library only): used by the judges and by the evaluation's greedy accuracy.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_ANSWER_RE = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\**\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def normalise_number(s: str | None) -> str | None:
    """Canonical form of a numeric answer ("1,000.0" -> "1000"); non-numbers are stripped text."""
    if s is None:
        return None
    t = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return s.strip()
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _final_answer(text: str) -> tuple[re.Match, int, bool] | None:
    """The match holding the final answer, its group, and whether it was stated as ``Answer: <number>``:
    the last ``Answer:`` number, else the last number; None when the text has no number."""
    answers = list(_ANSWER_RE.finditer(text))
    if answers:
        return answers[-1], 1, True
    numbers = list(_NUMBER_RE.finditer(text))
    return (numbers[-1], 0, False) if numbers else None


def extract_answer(text: str) -> tuple[str | None, bool]:
    """The stated final answer and whether it was in the requested ``Answer: <number>`` format.

    Falls back to the last number in the text when no ``Answer:`` line is found.
    """
    found = _final_answer(text)
    if found is None:
        return None, False
    m, group, formatted = found
    return normalise_number(m.group(group)), formatted


def final_answer_span(text: str) -> tuple[int, int] | None:
    """Where :func:`extract_answer` reads the final answer (character span); None when the text has no number."""
    found = _final_answer(text)
    return None if found is None else found[0].span(found[1])


def is_correct(text: str, gold: str) -> tuple[bool, str | None, bool]:
    """(correct, extracted answer, stated as ``Answer: <number>``) of a response against the gold answer."""
    pred, formatted = extract_answer(text)
    return pred is not None and pred == normalise_number(gold), pred, formatted
