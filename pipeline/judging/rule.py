"""The rule verifier: the default judge (``judge.backend: rule``).

It checks the final answer against the gold one and orders candidates within the right ones and
within the wrong ones by format (a stated ``Answer: <number>`` line) and by whether they finished,
so the pick is not arbitrary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.judging.answers import is_correct
from pipeline.judging.selection import select_best_worst
from pipeline.judging.types import CandidateView, Group, Score, Verdict


@dataclass(frozen=True)
class RuleVerifier:
    """Score = 4·correct + 1·(answer stated as ``Answer: <n>``) + 0.5·(finished with EOS)."""

    min_gap: float  # judge.min_gap: a smaller best-worst gap is a tie
    w_correct: float = 4.0
    w_format: float = 1.0
    w_finished: float = 0.5
    name: str = "rule"

    def score_one(self, c: CandidateView, gold: str) -> Score:
        ok, pred, formatted = is_correct(c.text, gold)
        s = self.w_correct * ok + self.w_format * formatted + self.w_finished * (c.finish_reason == "stop")
        return Score(c.idx, float(s), ok, pred)

    def judge(self, groups: Sequence[Group]) -> list[Verdict]:
        out = []
        for g in groups:
            scores = tuple(self.score_one(c, g.answer) for c in g.candidates)
            best, worst, status = select_best_worst(scores, {c.idx: c.num_tokens for c in g.candidates}, self.min_gap)
            out.append(Verdict(g.prompt_id, scores, best, worst, status))
        return out
