"""Judges: score the N candidates of a prompt and pick the best and the worst.

A judge implements :class:`Judge` (``judge(groups) -> list[Verdict]``); :func:`get_judge` picks
one by ``judge.backend`` in ``params.yaml``. The default :class:`RuleVerifier` checks the final
answer against the gold one and orders candidates within the right ones and within the wrong
ones by format (a stated ``Answer: <number>`` line) and by whether they finished, so the pick is
not arbitrary. An LLM judge plugs into the same registry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Protocol


@dataclass(frozen=True)
class CandidateView:
    idx: int
    text: str
    num_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class Group:
    prompt_id: str
    question: str
    answer: str  # gold final answer
    candidates: tuple[CandidateView, ...]


@dataclass(frozen=True)
class Score:
    idx: int
    score: float | None  # None: the judge failed on this candidate (never read as a score)
    correct: bool | None = None
    extracted_answer: str | None = None


@dataclass(frozen=True)
class Verdict:
    prompt_id: str
    scores: tuple[Score, ...]
    best: int | None  # candidate idx; None when the judge failed on the group
    worst: int | None
    status: str = "ok"  # ok | tie | failed
    extra: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str

    def judge(self, groups: Sequence[Group]) -> list[Verdict]: ...


# ----------------------------------------------------------------------------- answers
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


def extract_answer(text: str) -> tuple[str | None, bool]:
    """The stated final answer and whether it was in the requested ``Answer: <number>`` format.

    Falls back to the last number in the text when no ``Answer:`` line is found.
    """
    m = None
    for m in _ANSWER_RE.finditer(text):
        pass
    if m is not None:
        return normalise_number(m.group(1)), True
    nums = _NUMBER_RE.findall(text)
    return (normalise_number(nums[-1]) if nums else None), False


def is_correct(text: str, gold: str) -> tuple[bool, str | None, bool]:
    pred, formatted = extract_answer(text)
    return pred is not None and pred == normalise_number(gold), pred, formatted


# ----------------------------------------------------------------------------- selection
def select_best_worst(scores: Sequence[Score], lengths: dict[int, int], min_gap: float = 1e-9):
    """Best = highest score, ties to the shortest then the lowest idx; worst = lowest score, ties
    to the longest then the highest idx. Returns (best, worst, status); failed scores are ignored.

    A group whose best and worst scores differ by less than ``min_gap`` gets status ``tie``: its
    picks are still reported (scenario 2 uses the worst) but scenario 1 drops it."""
    valid = [s for s in scores if s.score is not None]
    if len(valid) < 2:
        return None, None, "failed"
    best = min(valid, key=lambda s: (-s.score, lengths.get(s.idx, 0), s.idx))
    worst = min(valid, key=lambda s: (s.score, -lengths.get(s.idx, 0), -s.idx))
    if best.score - worst.score < min_gap:
        return best.idx, worst.idx, "tie"
    return best.idx, worst.idx, "ok"


# ----------------------------------------------------------------------------- rule verifier
@dataclass(frozen=True)
class RuleVerifier:
    """Score = 4·correct + 1·(answer stated as ``Answer: <n>``) + 0.5·(finished with EOS)."""

    w_correct: float = 4.0
    w_format: float = 1.0
    w_finished: float = 0.5
    min_gap: float = 1e-9
    name: str = "rule"

    def score_one(self, c: CandidateView, gold: str) -> Score:
        ok, pred, formatted = is_correct(c.text, gold)
        s = self.w_correct * ok + self.w_format * formatted + self.w_finished * (c.finish_reason == "stop")
        return Score(c.idx, float(s), ok, pred)

    def judge(self, groups: Sequence[Group]) -> list[Verdict]:
        out = []
        for g in groups:
            scores = tuple(self.score_one(c, g.answer) for c in g.candidates)
            best, worst, status = select_best_worst(scores, {c.idx: c.num_tokens for c in g.candidates},
                                                    self.min_gap)
            out.append(Verdict(g.prompt_id, scores, best, worst, status))
        return out


def get_judge(backend: str, *, llm=None, **kwargs) -> Judge:
    """``rule`` or ``llm`` (``llm``: the ``judge.llm`` params, :class:`pipeline.config.LLMJudgeParams`)."""
    if backend == "rule":
        return RuleVerifier(**kwargs)
    if backend == "llm":
        from pipeline.config import LLMJudgeParams
        from pipeline.judging.llm import LLMJudge  # lazy: imports the openai client

        return LLMJudge(llm if llm is not None else LLMJudgeParams(), **kwargs)
    raise ValueError(f"judge.backend: unknown judge {backend!r} (available: rule, llm)")
