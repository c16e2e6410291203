"""Strict parsing of the LLM judge's answers (pipeline/judging/llm/parsing.py)."""

import pytest

from pipeline.judging.llm.parsing import ParseError, parse_listwise, parse_rubric


@pytest.mark.parametrize(
    "text,score",
    [
        ('{"score": 5}', 5),
        ('```json\n{"score": 3}\n```', 3),
        ('Sure. {"score": 2} is my verdict', 2),
        ("Score: 4", 4),
        ("4", 4),
        ('{"score": "5"}', 5),
        ('{"score": 4.0}', 4),
        ("**Score**: 1", 1),
    ],
)
def test_parse_rubric_accepts(text, score):
    assert parse_rubric(text) == {"score": score}


@pytest.mark.parametrize(
    "text",
    [
        '{"score": 7}',
        '{"score": 0}',
        '{"score": 3.5}',
        '{"score": true}',
        '{"grade": 4}',
        "",
        None,
        "This response looks reasonable.",
        "Score: 9",
        '{"score": null}',
    ],
)
def test_parse_rubric_rejects(text):
    with pytest.raises(ParseError):
        parse_rubric(text)


def test_parse_listwise():
    assert parse_listwise('{"best": 2, "worst": 4, "all_equal": false}', 4) == {
        "best": 2,
        "worst": 4,
        "all_equal": False,
    }
    assert parse_listwise("Best: Response 3. Worst: Response 1.", 4)["best"] == 3
    assert parse_listwise('{"best": 1, "worst": 1, "all_equal": true}', 4)["all_equal"] is True
    for bad in (
        '{"best": 5, "worst": 1, "all_equal": false}',
        '{"best": 2, "worst": 2, "all_equal": false}',
        '{"best": 2}',
        "they are all fine",
        '{"best": 1, "worst": 2, "all_equal": "no"}',
    ):
        with pytest.raises(ParseError):
            parse_listwise(bad, 4)
