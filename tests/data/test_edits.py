"""Controlled edits of correct responses (the DPOP paper's constructed pairs): what each kind changes, that
the result is always wrong, and that the kinds span edit distance."""

from __future__ import annotations

import random

import pytest

from pipeline.data.edits import KINDS, edit
from pipeline.judging.answers import extract_answer, is_correct

CHAIN = "41 + 64 = 105\nAnswer: 105"
COT = "She buys 3 packs of 12 eggs: 3 * 12 = 36 eggs.\nShe uses 6, so 36 - 6 = 30.\nAnswer: 30"


def numbers(text):
    import re

    return re.findall(r"-?\d+", text)


@pytest.mark.parametrize("seed", range(20))
def test_final_changes_only_the_stated_answer(seed):
    out = edit(CHAIN, "final", "105", random.Random(seed))
    assert out.startswith("41 + 64 = 105\nAnswer: ") and out != CHAIN
    new = extract_answer(out)[0]
    assert new != "105" and len(new) == 3  # same digit count
    assert not is_correct(out, "105")[0]


@pytest.mark.parametrize("seed", range(20))
def test_step_changes_the_answer_value_wherever_it_occurs(seed):
    out = edit(COT, "step", "30", random.Random(seed))
    before, after = numbers(COT), numbers(out)
    assert len(before) == len(after)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert changed == [i for i, a in enumerate(before) if a == "30"]  # the step's result and the answer
    assert len({after[i] for i in changed}) == 1  # one consistent wrong value
    assert not is_correct(out, "30")[0]


@pytest.mark.parametrize("seed", range(20))
def test_all_changes_every_number_consistently(seed):
    out = edit(COT, "all", "30", random.Random(seed))
    before, after = numbers(COT), numbers(out)
    assert all(a != b and len(a) == len(b) for a, b in zip(before, after))
    mapping = {}
    for a, b in zip(before, after):
        assert mapping.setdefault(a, b) == b  # each value maps to one new value (36 twice, 30 twice)
    assert not is_correct(out, "30")[0]


def test_signs_decimals_commas_and_no_numbers():
    out = edit("-7 + 0 = -7\nAnswer: -7", "step", "-7", random.Random(0))
    assert numbers(out)[1] == "0" and numbers(out)[0] == numbers(out)[2] == numbers(out)[3] != "-7"
    assert numbers(out)[0].startswith("-")
    out = edit("Half of 5 is 2.5\nAnswer: 2.5", "final", "2.5", random.Random(0))
    assert out.endswith(".5") and not is_correct(out, "2.5")[0]
    out = edit("1,000 + 0 = 1,000\nAnswer: 1,000", "final", "1000", random.Random(0))
    assert not is_correct(out, "1000")[0] and len(extract_answer(out)[0]) == 4
    assert edit("no numbers here", "all", "3", random.Random(0)) is None
    with pytest.raises(ValueError, match="unknown edit kind 'swap'"):
        edit(CHAIN, "swap", "105", random.Random(0))


def test_the_kinds_span_edit_distance(tokenizer):
    """On the default's response shape, final < step < all in token edit distance, for every seed."""
    from pipeline.data.tagging import normalised_distance
    from pipeline.model.encoding import encode_response

    ids = encode_response(tokenizer, CHAIN)
    for seed in range(10):
        d = [
            normalised_distance(ids, encode_response(tokenizer, edit(CHAIN, k, "105", random.Random(seed))))
            for k in KINDS
        ]
        assert d[0] < d[1] < d[2], (seed, d)
