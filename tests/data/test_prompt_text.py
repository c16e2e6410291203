"""pipeline/data/prompt_text.py: prompt ids and the prompt the model sees."""

from __future__ import annotations

from pipeline.data.prompt_text import make_prompt, prompt_id


def test_prompt_id_and_make_prompt():
    assert prompt_id("What is  1+1? ") == prompt_id("what is 1+1?")
    assert len(prompt_id("x")) == 16
    assert (
        make_prompt("Q?", " Give the final answer as 'Answer: <number>'.")
        == "Q? Give the final answer as 'Answer: <number>'."
    )
