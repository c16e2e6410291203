"""The rule verifier (pipeline/judging/rule.py), with judge.min_gap from the repository's params.yaml."""

import pytest
from repo_utils import repo_params

from pipeline.judging.rule import RuleVerifier
from pipeline.judging.types import CandidateView, Group


@pytest.fixture(scope="module")
def min_gap() -> float:
    return repo_params()["judge"]["min_gap"]


def _group(texts, finish=None):
    finish = finish or ["stop"] * len(texts)
    return Group("p", "q", "7", tuple(CandidateView(i, t, len(t), f) for i, (t, f) in enumerate(zip(texts, finish))))


def test_rule_verifier_orders_within_right_and_wrong(min_gap):
    g = _group(["7", "Answer: 7", "Answer: 8", "8"], ["stop", "stop", "stop", "length"])
    v = RuleVerifier(min_gap=min_gap).judge([g])[0]
    scores = [s.score for s in v.scores]
    assert scores == [4.5, 5.5, 1.5, 0.0]
    assert (v.best, v.worst, v.status) == (1, 3, "ok")
    assert [s.correct for s in v.scores] == [True, True, False, False]


def test_all_equal_candidates_tie_and_tie_break_rule(min_gap):
    g = _group(["Answer: 8", "Answer: 9 longer", "Answer: 3"])
    v = RuleVerifier(min_gap=min_gap).judge([g])[0]
    assert v.status == "tie"
    # best: shortest then lowest index; worst: longest then highest index
    assert v.best == 0 and v.worst == 1
