"""Token ids of prompts and responses, laid out as the model's chat template lays out a conversation.

Sampling, pair building, training and scoring all encode through here, so a response is scored on
exactly the tokens that follow its prompt when it is sampled.
"""

from __future__ import annotations


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user turn plus the assistant header, via the model's chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response written as text (e.g. a gold solution), ending with EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
