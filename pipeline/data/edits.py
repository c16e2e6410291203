"""Controlled edits that turn a correct math response into a wrong one, for constructed pairs.

The DPOP paper (Pal et al. 2024, arXiv 2402.13228) built its low-edit-distance preference sets
this way: the chosen is a correct solution, the rejected the same solution with a calculation changed.
Edits of different reach give pairs that span edit distance, so that the question of that paper
(does DPO lower the chosen likelihood more when chosen and rejected differ by few tokens?) can be asked
of one data set. Each kind changes numbers only, keeps their digit count and sign, and always changes
the final answer, so the rejected is wrong by construction (:func:`edit` checks it):

- ``final``: only the stated final answer (the ``Answer: <n>`` number, else the last number);
- ``step``: every occurrence of the final answer's value, i.e. the step that computes it and the answer;
- ``all``: every number of the response, each value mapped to another (a wrong derivation throughout).
"""

from __future__ import annotations

import random
import re

from pipeline.judging.answers import final_answer_span, is_correct, normalise_number

KINDS = ("final", "step", "all")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _other_number(token: str, rng: random.Random) -> str:
    """A different number with the same sign, the same count of integer digits and the same decimals."""
    sign = "-" if token.startswith("-") else ""
    whole, dot, frac = token.lstrip("-").partition(".")
    whole = whole or "0"
    lo, hi = (10 ** (len(whole) - 1), 10 ** len(whole) - 1) if len(whole) > 1 else (0, 9)
    new = int(whole)
    while new == int(whole):
        new = rng.randint(lo, hi)
    return f"{sign}{new}{dot}{frac}"


def edit(text: str, kind: str, gold: str, rng: random.Random) -> str | None:
    """``text`` (a correct response to a problem whose answer is ``gold``) with the ``kind`` edit; None
    when the text has no number to change. The result always states a wrong final answer."""
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r} (known: {', '.join(KINDS)})")
    span = final_answer_span(text)
    if span is None:
        return None
    answer = text[span[0] : span[1]].replace(",", "")
    target = normalise_number(answer)
    new_values = {target: _other_number(answer, rng)}
    if kind == "final":
        out = text[: span[0]] + new_values[target] + text[span[1] :]
    else:

        def swap(m: re.Match) -> str:
            value = normalise_number(m.group(0))
            if kind == "step" and value != target:
                return m.group(0)
            if value not in new_values:
                new_values[value] = _other_number(m.group(0), rng)
            return new_values[value]

        out = _NUMBER.sub(swap, text[: span[0]]) + new_values[target] + _NUMBER.sub(swap, text[span[1] :])
    if is_correct(out, gold)[0]:
        raise AssertionError(f"edit {kind!r} left the answer correct: {out!r}")
    return out
