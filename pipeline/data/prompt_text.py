"""The text conventions of prompts and gold answers: the question's key and id, the prompt the model sees, the
``Answer: X`` line every gold solution ends with, and reading the final answer of a GSM8K (``#### X``) or MATH
(``\\boxed{X}``) solution."""

from __future__ import annotations

import hashlib
import re


def normalize_question(question: str) -> str:
    """Stripped, whitespace-collapsed, case-folded: the key for duplicates and ids."""
    return " ".join(question.split()).casefold()


def prompt_id(question: str) -> str:
    """Stable id: the first 16 hex characters of the sha1 of the normalised question."""
    return hashlib.sha1(normalize_question(question).encode("utf-8")).hexdigest()[:16]


def make_prompt(question: str, instruction: str) -> str:
    """What the model sees: the question followed by the answer-format instruction."""
    question = question.strip()
    if instruction and not instruction[0].isspace():
        instruction = " " + instruction
    return question + instruction


def answer_line(answer: str) -> str:
    return f"Answer: {answer}"


_HASH_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)


def with_answer_line(text: str, answer: str) -> str:
    """``text`` with its last ``#### X`` line replaced by ``Answer: X`` (or one appended)."""
    text = text.rstrip()
    matches = list(_HASH_LINE.finditer(text))
    if matches:
        m = matches[-1]
        final = m.group(1).strip() or answer
        text = (text[: m.start()] + answer_line(final) + text[m.end() :]).rstrip()
        return text
    last = text.splitlines()[-1].strip() if text else ""
    if last.startswith("Answer:"):
        return text
    return f"{text}\n{answer_line(answer)}" if text else answer_line(answer)


def split_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """``"<reasoning>\\n#### 1,234"`` -> (``"1234"``, reasoning with ``Answer: 1234``); None if no ``####``."""
    matches = list(_HASH_LINE.finditer(text))
    if not matches:
        idx = text.rfind("####")  # "#### X" not on its own line
        if idx < 0:
            return None
        final = text[idx + 4 :].strip().replace(",", "").strip()
        reasoning = text[:idx].rstrip()
    else:
        m = matches[-1]
        final = m.group(1).replace(",", "").strip()
        reasoning = text[: m.start()].rstrip()
    solution = f"{reasoning}\n{answer_line(final)}" if reasoning else answer_line(final)
    return final, solution


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces handled), or None."""
    start = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        start = m.end()
    if start is None:
        return None
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):  # skip escaped characters such as \{ and \}
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None  # unbalanced
