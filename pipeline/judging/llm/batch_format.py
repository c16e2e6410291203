"""The OpenAI Batch API's JSONL files: the request lines the judge uploads and the result lines it reads back.

A request line is ``{"custom_id": <cache key>, "method": "POST", "url": "/v1/chat/completions",
"body": <the body the synchronous mode sends>}``. A result line, in the output and the error file alike,
is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {"code",
"message"} | null}``; vLLM's offline runner (``vllm run_batch``) reads and writes the same format.
Reading is tolerant per line: a line that cannot be attributed to a request is reported with its file
and line number, and its request, left without a result, counts as failed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ENDPOINT = "/v1/chat/completions"
# The Batch API's limits per batch: 50,000 requests and an input file of 200 MB (a margin kept under it).
MAX_REQUESTS = 50_000
MAX_BYTES = 190 * 2**20


def request_line(custom_id: str, body: dict) -> str:
    """One line of a batch input file (without its newline)."""
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}, ensure_ascii=False, sort_keys=True
    )


def split_lines(sizes: Sequence[int], max_requests: int, max_bytes: int) -> list[slice]:
    """Consecutive runs of lines (of ``sizes`` bytes each, newline included) within both limits per file."""
    parts: list[slice] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if size > max_bytes:
            raise ValueError(f"batch request {i} is {size} bytes, over the {max_bytes}-byte limit of a batch file")
        if i > start and (i - start >= max_requests or total + size > max_bytes):
            parts.append(slice(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        parts.append(slice(start, len(sizes)))
    return parts


def request_set_id(keys: Iterable[str]) -> str:
    """A name for a set of requests (the sha256 of their sorted cache keys): one batch's record."""
    return hashlib.sha256("\n".join(sorted(keys)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Result:
    custom_id: str
    content: str | None  # the answer's text when the request returned a chat completion
    usage: dict[str, int]
    # None: a chat completion; malformed_response: status 200 without one; http_<status>: another
    # status; batch_<code>: no response, the batch's own error (batch_expired, ...)
    failure: str | None


def _usage(body: dict) -> dict[str, int]:
    u = body.get("usage")
    u = u if isinstance(u, dict) else {}
    return {k: int(u.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


def _result(obj: dict) -> Result:
    cid = obj["custom_id"]
    response, error = obj.get("response"), obj.get("error")
    if isinstance(response, dict) and response.get("status_code") is not None:
        status = response["status_code"]
        body = response.get("body")
        body = body if isinstance(body, dict) else {}
        if status != 200:
            return Result(cid, None, _usage(body), f"http_{status}")
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return Result(cid, None, _usage(body), "malformed_response")
        if content is not None and not isinstance(content, str):
            return Result(cid, None, _usage(body), "malformed_response")
        return Result(cid, content, _usage(body), None)
    code = error.get("code") if isinstance(error, dict) else None
    reason = re.sub(r"[^a-z0-9_]+", "_", str(code or "error").lower()).strip("_")
    return Result(cid, None, {"prompt_tokens": 0, "completion_tokens": 0}, f"batch_{reason}")


def read_results(text: str, source: str) -> tuple[list[Result], list[str]]:
    """The results in a batch output or error file ``source`` (for messages), and a problem message for
    each line that names no request."""
    results: list[Result] = []
    problems: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            problems.append(f"{source} line {n}: not JSON")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            problems.append(f"{source} line {n}: no custom_id")
            continue
        results.append(_result(obj))
    return results, problems
