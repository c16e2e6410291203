"""The judge's prompts: the rubric of Yan et al., "3D-Properties: Identifying Challenges in DPO and
Charting a Path Forward" (arXiv:2406.07327), in two modes.

``TEMPLATE_VERSION`` and ``TEMPLATE_HASH`` are part of every cache key
(:meth:`pipeline.judging.llm.judge.LLMJudge.rubric_request`): editing a template changes the hash, so
answers to the old wording are never reused.
"""

from __future__ import annotations

import hashlib

TEMPLATE_VERSION = "v1"

RUBRIC = """\
5: correct answer, correct and complete process.
4: correct answer but the process is missing (complex question) or very redundant (simple one).
3: wrong answer but mostly correct process, or right answer with obvious errors in the process.
2: wrong answer and mostly wrong process.
1: answer and process entirely wrong, or no final result."""

SYSTEM_RUBRIC = f"""\
You grade a response to a math problem with this rubric (points):
{RUBRIC}
Reply with a JSON object only, no other text: {{"score": <integer 1-5>}}"""

SYSTEM_LISTWISE = f"""\
You compare several responses to the same math problem. Judge each with this rubric (points):
{RUBRIC}
Name the number of the best response and of the worst response. If all responses are equally good
or equally bad, set "all_equal" to true.
Reply with a JSON object only, no other text: {{"best": <number>, "worst": <number>, "all_equal": <true or false>}}"""

USER_QUESTION = "Question:\n{question}\n"
USER_REFERENCE = "\nReference final answer: {answer}\n"
USER_RUBRIC = "\nResponse:\n<<<\n{response}\n>>>"
USER_LISTWISE_ITEM = "\n[Response {k}]\n{response}\n[End of Response {k}]\n"

_TEMPLATES = {
    "rubric": SYSTEM_RUBRIC + "\x00" + USER_QUESTION + USER_REFERENCE + USER_RUBRIC,
    "listwise": SYSTEM_LISTWISE + "\x00" + USER_QUESTION + USER_REFERENCE + USER_LISTWISE_ITEM,
}
TEMPLATE_HASH = {m: hashlib.sha256(t.encode()).hexdigest()[:16] for m, t in _TEMPLATES.items()}
