"""Best/worst selection from scores (pipeline/judging/selection.py)."""

from pipeline.judging.selection import select_best_worst
from pipeline.judging.types import Score


def test_failed_scores_are_not_read_as_scores():
    scores = [Score(0, None), Score(1, 2.0), Score(2, None)]
    assert select_best_worst(scores, {}, min_gap=1e-9) == (None, None, "failed")
