"""The HTTP side of the LLM judge: requests, the ``openai`` client, retries, concurrency and usage.

Requests go through the official ``openai`` async client, whose own retry handles 408/409/429/5xx
and timeouts with exponential backoff, jitter and ``Retry-After`` (``judge.llm.max_retries``); at most
``judge.llm.max_in_flight`` requests are in flight. A malformed answer (:class:`~.parsing.ParseError`,
or a body that is not a chat completion) is asked again up to ``judge.llm.max_parse_retries`` times and
then counted as a failure. Valid answers are written to the answer cache as soon as they arrive;
failures are not. The API key is read from the environment variable named by ``judge.llm.api_key_env``
and never logged, stored or put into an exception message (:meth:`JudgeClient.redact`).

The Batch API mode (:mod:`.batch`) sends the same bodies (:meth:`JudgeClient.body`) and takes its
results through the same steps (:meth:`~JudgeClient.keep`, :meth:`~JudgeClient.malformed`,
:meth:`~JudgeClient.fail`). ``openai`` is imported only when requests are sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.judging.cache import JudgeCache
from pipeline.judging.llm.parsing import ParseError, parse_listwise, parse_rubric
from pipeline.judging.llm.templates import TEMPLATE_VERSION

if TYPE_CHECKING:
    from pipeline.settings.judge import LLMJudgeParams

T = TypeVar("T")

log = logging.getLogger("pipeline.judging.llm")


class LLMJudgeError(RuntimeError):
    """A fatal judge error (bad key, unknown model, too many failures). Never contains the key."""


@dataclass(frozen=True)
class Request:
    key: str
    kind: str  # rubric | listwise
    messages: tuple[dict, ...]
    response_format: dict
    n: int  # candidates shown
    meta: dict  # prompt_id and candidate idx / shown order, for the cache record (audit only)

    def parse(self, text: str | None) -> dict:
        return parse_rubric(text) if self.kind == "rubric" else parse_listwise(text, self.n)

    def est_input_tokens(self) -> int:
        # ~4 characters per token plus a few tokens of framing per message; no tokenizer needed.
        return sum(len(m["content"]) // 4 + 4 for m in self.messages)


@dataclass
class Outcome:
    answer: dict | None = None
    failure: str | None = None  # a short code, never server text
    cached: bool = False


@dataclass
class Stats:
    requests_planned: int = 0
    cache_hits: int = 0
    calls: int = 0  # create() calls that returned an answer (valid or not) or failed for good
    parse_failures: int = 0
    api_failures: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    # The Batch API's share of the tokens above (priced at judge.llm.batch_price_factor)
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    cached_batch_prompt_tokens: int = 0
    cached_batch_completion_tokens: int = 0
    batch_ids: list[str] = field(default_factory=list)  # the batches this run submitted or resumed
    failure_reasons: Counter = field(default_factory=Counter)

    def count_cached(self, record: dict) -> None:
        """Count the tokens a cached answer cost when it was asked (a Batch API answer names its batch)."""
        u = record.get("usage") or {}
        pt, ct = int(u.get("prompt_tokens", 0) or 0), int(u.get("completion_tokens", 0) or 0)
        self.cached_prompt_tokens += pt
        self.cached_completion_tokens += ct
        if record.get("batch_id"):
            self.cached_batch_prompt_tokens += pt
            self.cached_batch_completion_tokens += ct


def run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from a thread that already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["e"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


class JudgeClient:
    """Sends requests to the endpoint of ``params`` and caches every valid answer in ``cache``,
    counting calls, failures and tokens in ``stats``. ``client_factory(api_key)`` replaces
    ``openai.AsyncOpenAI`` (tests)."""

    def __init__(
        self,
        params: LLMJudgeParams,
        cache: JudgeCache,
        stats: Stats,
        client_factory: Callable[[str], Any] | None = None,
    ):
        self.p = params
        self.cache = cache
        self.stats = stats
        self._client_factory = client_factory
        # Whether to ask for a JSON schema; switched off for good once the endpoint refuses it.
        self.structured = params.structured_output
        self._secret: str | None = None

    def _api_key(self) -> str:
        name = self.p.api_key_env
        if name is None:
            return "EMPTY"  # a local server without authentication
        key = os.environ.get(name)
        if not key:
            raise LLMJudgeError(
                f"judge.llm.api_key_env: the environment variable {name} is not set "
                "(it must hold the API key; use null for a server without a key)"
            )
        return key

    def redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        return re.sub(r"\bsk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)

    def make_client(self):
        """The ``openai`` async client for the endpoint (or ``client_factory``'s), with the key from the environment."""
        key = self._api_key()
        self._secret = key
        if self._client_factory is not None:
            return self._client_factory(key)
        import openai

        return openai.AsyncOpenAI(
            api_key=key, base_url=self.p.base_url, timeout=self.p.timeout_s, max_retries=self.p.max_retries
        )

    def body(self, r: Request, structured: bool) -> dict:
        """The Chat Completions request body of ``r`` (also each line of a Batch API file)."""
        body = {
            "model": self.p.model,
            "messages": list(r.messages),
            "temperature": self.p.temperature,
            "max_tokens": self.p.max_tokens,
        }
        if structured:
            body["response_format"] = r.response_format
        return body

    async def _call(self, client, sem: asyncio.Semaphore, r: Request, bad_answers: int) -> tuple[str, Outcome]:
        import openai

        while True:
            try:
                async with sem:
                    structured = self.structured  # read once a slot is free: a refusal may have come meanwhile
                    resp = await client.chat.completions.create(**self.body(r, structured))
                choices = getattr(resp, "choices", None)
                if not choices:
                    raise ValueError("no choices in the response")
                content = choices[0].message.content
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise LLMJudgeError(
                    f"judge.llm: {type(e).__name__} (HTTP {e.status_code}) from "
                    f"{self.p.base_url or 'the OpenAI API'} for model {self.p.model!r}: "
                    f"{self.redact(str(e.message))[:300]}"
                ) from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                msg = self.redact(str(e.message)).lower()
                if structured and any(w in msg for w in ("response_format", "json_schema", "structured")):
                    if self.structured:
                        self.structured = False
                        log.warning(
                            "the endpoint refused structured output (HTTP %d); asking for plain JSON "
                            "text and parsing it instead",
                            e.status_code,
                        )
                    continue
                if structured and not self.structured:
                    continue  # another request switched to plain text meanwhile
                return r.key, self.fail(f"http_{e.status_code}", api=True)
            except openai.APITimeoutError:
                return r.key, self.fail("timeout", api=True)
            except openai.APIConnectionError:
                return r.key, self.fail("connection", api=True)
            except openai.APIStatusError as e:  # 429/5xx after the client's retries, other 4xx
                return r.key, self.fail(f"http_{e.status_code}", api=True)
            except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError, IndexError) as e:
                # A body that is not a chat completion: as malformed as a bad answer.
                self.stats.calls += 1
                bad_answers += 1
                if self.malformed("response", type(e).__name__, r, bad_answers):
                    return r.key, self.fail("malformed_response")
                continue
            self.stats.calls += 1
            usage = self._usage(resp)
            try:
                answer = r.parse(content)
            except ParseError as e:
                bad_answers += 1
                if self.malformed("answer", e, r, bad_answers):
                    return r.key, self.fail("malformed_answer")
                continue
            self.keep(r, answer, content, usage)
            return r.key, Outcome(answer)

    def malformed(self, what: str, detail: object, r: Request, attempt: int) -> bool:
        """Count a malformed response or answer (the request's ``attempt``-th); True once no retry is left."""
        self.stats.parse_failures += 1
        log.warning(
            "malformed %s (%s) for %s; attempt %d of %d",
            what,
            detail,
            self.where(r),
            attempt,
            self.p.max_parse_retries + 1,
        )
        return attempt > self.p.max_parse_retries

    def keep(self, r: Request, answer: dict, content: str | None, usage: dict, batch_id: str | None = None) -> None:
        """Cache a valid answer with what produced it (``batch_id``: the Batch API's batch that answered it)."""
        record = {
            "answer": answer,
            "content": content,
            "usage": usage,
            "model": self.p.model,
            "mode": r.kind,
            "template_version": TEMPLATE_VERSION,
            "meta": r.meta,
        }
        self.cache.put(r.key, {**record, "batch_id": batch_id} if batch_id else record)

    @staticmethod
    def where(r: Request) -> str:
        m = r.meta
        return f"prompt {m.get('prompt_id')}" + (f" candidate {m['candidate_idx']}" if "candidate_idx" in m else "")

    def fail(self, reason: str, api: bool = False) -> Outcome:
        if api:
            self.stats.calls += 1
            self.stats.api_failures += 1
        self.stats.failed_requests += 1
        self.stats.failure_reasons[reason] += 1
        return Outcome(failure=reason)

    def _usage(self, resp) -> dict:
        u = getattr(resp, "usage", None)
        pt, ct = int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        return {"prompt_tokens": pt, "completion_tokens": ct}

    async def _send_async(self, todo: Sequence[Request], results: dict[str, Outcome], bad_answers: int) -> None:
        client = self.make_client()
        sem = asyncio.Semaphore(self.p.max_in_flight)
        tasks = [asyncio.ensure_future(self._call(client, sem, r, bad_answers)) for r in todo]
        step = max(1, len(tasks) // 10)
        try:
            for i, fut in enumerate(asyncio.as_completed(tasks), 1):
                key, outcome = await fut
                results[key] = outcome
                if i % step == 0 or i == len(tasks):
                    log.info("judge requests: %d/%d done (%d failed so far)", i, len(tasks), self.stats.failed_requests)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                await close()

    def send(self, todo: Sequence[Request], results: dict[str, Outcome], bad_answers: int = 0) -> None:
        """Ask the endpoint for every request of ``todo`` (distinct keys), concurrently; each outcome goes
        into ``results`` under its key as it arrives. ``bad_answers``: malformed answers each request has
        had already (the Batch API's), counted against ``max_parse_retries``."""
        run_coro(self._send_async(todo, results, bad_answers))
