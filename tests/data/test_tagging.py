"""Pair tags (pipeline/data/tagging.py): token edit distance, first difference, scenarios, buckets."""

import pytest

from pipeline.data import tagging


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
