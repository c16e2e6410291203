"""The shared generation types: settings without defaults, the greedy constructor."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.generation.types import Candidate, GenerationSettings


def test_settings_have_no_defaults_and_take_keywords_only():
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(GenerationSettings))
    with pytest.raises(TypeError):
        GenerationSettings()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        GenerationSettings(4, 1.0, 1.0, 32, 0)  # type: ignore[misc]


def test_greedy_is_one_candidate_at_temperature_zero():
    assert GenerationSettings.greedy(7) == GenerationSettings(n=1, temperature=0.0, top_p=1.0, max_new_tokens=7, seed=0)


def test_candidates_are_immutable_values_where_every_field_counts():
    """A resumed run rebuilds candidates from saved rows, and they must equal fresh samples: equal fields make
    equal candidates, any one differing field an unequal one. Results are shared, never copied: frozen (and
    so hashable, equal candidates alike)."""
    fields = {"text": "a", "token_ids": (1, 2), "logprob_sum": -1.0, "finish_reason": "stop"}
    other = {"text": "b", "token_ids": (1, 3), "logprob_sum": -1.5, "finish_reason": "length"}
    c = Candidate(**fields)
    rebuilt = Candidate(*fields.values())  # a new object, as read back from a row
    assert rebuilt is not c and rebuilt == c and hash(rebuilt) == hash(c) and len({c, rebuilt}) == 1
    for name in fields:
        assert Candidate(**{**fields, name: other[name]}) != c, name
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.text = "b"  # type: ignore[misc]
