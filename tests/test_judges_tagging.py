import pytest

from pipeline.data import tagging
from pipeline.judging.rule import CandidateView, Group, RuleVerifier, Score, extract_answer, normalise_number, select_best_worst


@pytest.mark.parametrize("text,expected", [
    ("3 + 4 = 7\nAnswer: 7", ("7", True)),
    ("The answer is 1,200.", ("1200", True)),
    ("so we get 12 and then 15", ("15", False)),
    ("Answer: -4.0", ("-4", True)),
    ("no number here", (None, False)),
    ("Answer: <number>", (None, False)),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalise_number():
    assert normalise_number("1,000.0") == "1000" and normalise_number("0.50") == "0.5"


def _group(texts, finish=None):
    finish = finish or ["stop"] * len(texts)
    return Group("p", "q", "7", tuple(CandidateView(i, t, len(t), f) for i, (t, f) in enumerate(zip(texts, finish))))


def test_rule_verifier_orders_within_right_and_wrong():
    g = _group(["7", "Answer: 7", "Answer: 8", "8"], ["stop", "stop", "stop", "length"])
    v = RuleVerifier().judge([g])[0]
    scores = [s.score for s in v.scores]
    assert scores == [4.5, 5.5, 1.5, 0.0]
    assert (v.best, v.worst, v.status) == (1, 3, "ok")
    assert [s.correct for s in v.scores] == [True, True, False, False]


def test_all_equal_candidates_tie_and_tie_break_rule():
    g = _group(["Answer: 8", "Answer: 9 longer", "Answer: 3"])
    v = RuleVerifier().judge([g])[0]
    assert v.status == "tie"
    # best: shortest then lowest index; worst: longest then highest index
    assert v.best == 0 and v.worst == 1


def test_failed_scores_are_not_read_as_scores():
    scores = [Score(0, None), Score(1, 2.0), Score(2, None)]
    assert select_best_worst(scores, {}) == (None, None, "failed")


def test_token_edit_distance_uses_token_ids():
    a, b = [5, 6, 7, 8], [5, 9, 7]
    assert tagging.edit_distance(a, b) == 2  # substitute 6->9, delete 8
    assert tagging.normalised_distance(a, b) == pytest.approx(2 / 4)
    assert tagging.first_difference(a, b) == 1
    assert tagging.first_difference([1, 2], [1, 2, 3]) == 2
    # tokens compared as whole items, not characters: 12 vs 21 differ by one substitution
    assert tagging.edit_distance([12, 3], [21, 3]) == 1


def test_scenarios_and_buckets():
    assert tagging.scenario_of("policy", "policy") == 1
    assert tagging.scenario_of("gold", "policy") == 2
    assert tagging.scenario_of("policy", "other") == 3
    assert tagging.scenario_of("gold", "other") == 4
    with pytest.raises(ValueError):
        tagging.scenario_of("other", "gold")
    edges = [0.25, 0.5]
    assert tagging.bucket_of(0.0, edges) == "[0.00,0.25)"
    assert tagging.bucket_of(0.25, edges) == "[0.25,0.50)"
    assert tagging.bucket_of(1.0, edges) == "[0.50,1.00]"
    assert tagging.bucket_labels(edges) == ["[0.00,0.25)", "[0.25,0.50)", "[0.50,1.00]"]
