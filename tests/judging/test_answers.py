"""Final-answer extraction and normalisation (pipeline/judging/answers.py)."""

import pytest

from pipeline.judging.answers import extract_answer, normalise_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7\nAnswer: 7", ("7", True)),
        ("The answer is 1,200.", ("1200", True)),
        ("so we get 12 and then 15", ("15", False)),
        ("Answer: -4.0", ("-4", True)),
        ("no number here", (None, False)),
        ("Answer: <number>", (None, False)),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalise_number():
    assert normalise_number("1,000.0") == "1000" and normalise_number("0.50") == "0.5"
