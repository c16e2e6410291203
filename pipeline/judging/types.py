"""The judges' vocabulary: what a judge sees (:class:`Group` of :class:`CandidateView`) and what it
returns (a :class:`Verdict` of :class:`Score` per group), and the :class:`Judge` protocol.

A leaf module: it imports nothing from the project, so every other judging module can import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
    @property
    def name(self) -> str: ...  # read-only: a frozen dataclass's field satisfies it

    def judge(self, groups: Sequence[Group]) -> list[Verdict]: ...
