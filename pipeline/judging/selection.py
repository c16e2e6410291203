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
    valid = [(s.score, s.idx) for s in scores if s.score is not None]
    if len(valid) < 2:
        return None, None, "failed"
    best_score, best_idx = min(valid, key=lambda v: (-v[0], lengths.get(v[1], 0), v[1]))
    worst_score, worst_idx = min(valid, key=lambda v: (v[0], -lengths.get(v[1], 0), -v[1]))
    if best_score - worst_score < min_gap:
        return best_idx, worst_idx, "tie"
    return best_idx, worst_idx, "ok"
