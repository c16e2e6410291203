"""pipeline/data/prompts.py: the prompt sets' splits."""

from __future__ import annotations

import pytest

from pipeline.data.prompts import split_prompts


def test_split_deterministic_and_not_enough_rows():
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]
    a = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, n_val=0, seed=3)
    b = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, n_val=0, seed=3)
    c = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, n_val=0, seed=4)
    assert a == b and a != c
    assert [r["split"] for r in a] == ["test"] * 5 + ["train"] * 8 + ["warmup"] * 4
    assert len({r["question"] for r in a}) == 17
    with pytest.raises(ValueError, match=r"prepare\.n_train.*prepare\.n_val = 15 \+ 5 \+ 0 \+ 1 = 21.*only 20"):
        split_prompts(rows, n_train=15, n_test=5, n_warmup=0, n_val=1, seed=0)


def test_validation_prompts_are_the_last_rows_and_leave_the_other_splits_alone():
    """A reasoning-gym task generates the same rows first whatever the count: with n_val more rows the
    validation prompts are the extra ones and every other prompt keeps its split."""
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(25)]
    without = split_prompts(rows[:20], n_train=8, n_test=5, n_warmup=4, n_val=0, seed=3)
    with_val = split_prompts(rows, n_train=8, n_test=5, n_warmup=4, n_val=5, seed=3)
    assert [r for r in with_val if r["split"] != "val"] == without
    assert [r["question"] for r in with_val if r["split"] == "val"] == [f"q{i}" for i in range(20, 25)]
    assert not {r["question"] for r in without} & {f"q{i}" for i in range(20, 25)}
