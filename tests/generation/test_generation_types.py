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
    assert GenerationSettings.greedy(7) == GenerationSettings(n=1, temperature=0.0, top_p=1.0, max_new_tokens=7,
                                                              seed=0)


def test_candidates_compare_by_value():
    assert Candidate("a", (1, 2), -1.0, "stop") == Candidate("a", (1, 2), -1.0, "stop")
