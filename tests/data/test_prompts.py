"""pipeline/data/prompts.py: the prompt sets' splits."""

from __future__ import annotations

import pytest

from pipeline.data.prompts import split_prompts


def test_split_deterministic_and_not_enough_rows():
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]
    a = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, seed=3)
    b = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, seed=3)
    c = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, seed=4)
    assert a == b and a != c
    assert [r["split"] for r in a] == ["test"] * 5 + ["train"] * 8 + ["warmup"] * 4
    assert len({r["question"] for r in a}) == 17
    with pytest.raises(ValueError, match=r"prepare\.n_train.*only 20"):
        split_prompts(rows, n_train=15, n_test=5, n_warmup=1, seed=0)
