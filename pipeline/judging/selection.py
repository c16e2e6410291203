"""Best and worst candidate of a group from its scores, with deterministic tie-breaks.

Shared by every judge; imports only :mod:`pipeline.judging.types`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.judging.types import Score


def select_best_worst(scores: Sequence[Score], lengths: dict[int, int], min_gap: float):
    """Best = highest score, ties to the shortest then the lowest idx; worst = lowest score, ties
    to the longest then the highest idx. Returns (best, worst, status); failed scores are ignored.

    A group whose best and worst scores differ by less than ``min_gap`` (``judge.min_gap``) gets
    status ``tie``: its picks are still reported (scenario 2 uses the worst) but scenario 1 drops it."""
    valid = [s for s in scores if s.score is not None]
    if len(valid) < 2:
        return None, None, "failed"
    best = min(valid, key=lambda s: (-s.score, lengths.get(s.idx, 0), s.idx))
    worst = min(valid, key=lambda s: (s.score, -lengths.get(s.idx, 0), -s.idx))
    if best.score - worst.score < min_gap:
        return best.idx, worst.idx, "tie"
    return best.idx, worst.idx, "ok"
