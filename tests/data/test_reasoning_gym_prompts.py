"""pipeline/data/reasoning_gym_prompts.py: unique reasoning-gym problems with gold solutions, deterministic in
the seed."""

from __future__ import annotations

import pytest

from pipeline.data.prompt_text import normalize_question
from pipeline.data.reasoning_gym_prompts import generate_reasoning_gym


def test_reasoning_gym_deterministic_and_chain_sum_solution():
    a = generate_reasoning_gym("chain_sum", {}, seed=7, n=20)
    b = generate_reasoning_gym("chain_sum", {}, seed=7, n=20)
    c = generate_reasoning_gym("chain_sum", {}, seed=8, n=20)
    assert a == b
    assert a != c
    assert len(a) == 20
    assert len({normalize_question(r["question"]) for r in a}) == 20
    r = a[0]
    assert set(r) == {"question", "answer", "solution", "source"}
    assert r["source"] == "reasoning_gym:chain_sum"
    first, last = r["solution"].splitlines()
    assert first.endswith(f" = {r['answer']}")
    assert last == f"Answer: {r['answer']}"


def test_reasoning_gym_gsm_symbolic_solution():
    rows = generate_reasoning_gym("gsm_symbolic", {}, seed=1, n=3)
    assert len(rows) == 3
    for r in rows:
        assert "####" not in r["solution"]
        assert r["solution"].splitlines()[-1] == f"Answer: {r['answer']}"
        assert len(r["solution"].splitlines()) > 2


def test_reasoning_gym_oversamples_past_duplicates():
    # 1-digit two-term sums have few distinct questions: duplicates are skipped, not returned
    cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    stats = {}
    rows = generate_reasoning_gym("chain_sum", cfg, seed=3, n=60, stats=stats)
    assert len(rows) == 60
    assert len({normalize_question(r["question"]) for r in rows}) == 60
    assert stats["duplicates"] > 0


def test_reasoning_gym_bad_task_and_config():
    with pytest.raises(ValueError, match=r"prepare\.reasoning_gym\.task"):
        generate_reasoning_gym("no_such_task", {}, seed=0, n=2)
    with pytest.raises(ValueError, match=r"prepare\.reasoning_gym\.config"):
        generate_reasoning_gym("chain_sum", {"bogus": 1}, seed=0, n=2)
