"""LLM judge: best/worst selection by a strong model behind any OpenAI-compatible endpoint.

Selected with ``judge.backend: llm``; settings in ``judge.llm`` (:class:`pipeline.config.LLMJudgeParams`).
Two modes, both with the rubric of the 3D paper (seed 001 §5.2):

- ``rubric``: one request per candidate, scored 1-5. Best = highest score, worst = lowest; ties are
  broken by :func:`pipeline.judging.rule.select_best_worst` (best: shortest, then lowest index; worst:
  longest, then highest index), and a group whose scores are all equal is a ``tie``.
- ``listwise``: one request per group, the candidates shown together in an order shuffled by
  ``seed`` and the prompt id (recorded as ``shown_order``); the judge names the best and the worst
  (or says all are equal: a ``tie``). Scores are +1 (best), -1 (worst), 0 (the others).

Requests go through the official ``openai`` async client, whose own retry handles 408/409/429/5xx
and timeouts with exponential backoff, jitter and ``Retry-After`` (``max_retries``). Answers are
parsed strictly: a JSON schema is requested (``response_format``), plain text is parsed by a
tolerant fallback (JSON anywhere in the text, or ``score: 4``), and a score outside 1-5, a missing
field or prose without a score is malformed: the request is repeated up to ``max_parse_retries``
times and then counted as a failure, never read as a score. Valid answers are cached
(:mod:`pipeline.judging.cache`) as soon as they arrive; failures are not cached, so a rerun asks again
for exactly those. The API key is read from the environment variable named by ``api_key_env`` and
never logged, stored or put into an exception message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.judging.cache import JudgeCache, cache_key, resolve_cache_dir
from pipeline.judging.rule import CandidateView, Group, Score, Verdict, is_correct, select_best_worst

log = logging.getLogger("pipeline.judging.llm")

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

# A typical answer, for the cost estimate of a dry run (the bound uses max_tokens).
TYPICAL_OUTPUT_TOKENS = {"rubric": 8, "listwise": 20}


class LLMJudgeError(RuntimeError):
    """A fatal judge error (bad key, unknown model, too many failures). Never contains the key."""


class ParseError(ValueError):
    """A malformed judge answer."""


# ----------------------------------------------------------------------------- parsing
_JSON_OBJ_RE = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_RE = re.compile(r"\bscore\b\W{0,4}(?:is|of)?\W{0,4}?(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_NUMBER_RE = re.compile(r"\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*\.?\s*")


def _json_object(text: str) -> dict | None:
    """The answer as a JSON object: the whole text, a fenced block, or the first ``{...}`` in it."""
    t = text.strip()
    if t.startswith("```"):
        t = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", t)
    for cand in (t, *(m.group(0) for m in _JSON_OBJ_RE.finditer(text))):
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _as_int(v: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or v is None:
        raise ParseError(f"{what}: not a number")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ParseError(f"{what}: not a number") from None
    if not isinstance(v, (int, float)) or v != int(v):
        raise ParseError(f"{what}: not an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise ParseError(f"{what}: {v} out of range {lo}-{hi}")
    return v


def parse_rubric(text: str | None) -> dict[str, int]:
    """``{"score": 1..5}`` from a JSON answer or, failing that, ``score: 4`` or a lone number."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    obj = _json_object(text)
    if obj is not None:
        if "score" not in obj:
            raise ParseError("no 'score' field")
        return {"score": _as_int(obj["score"], 1, 5, "score")}
    m = _BARE_NUMBER_RE.fullmatch(text) or _SCORE_RE.search(text)
    if m is None:
        raise ParseError("no score in the answer")
    return {"score": _as_int(m.group(1), 1, 5, "score")}


_BEST_RE = re.compile(r"\bbest\b\W{0,3}(?:response\s*)?(?:is\s*)?#?(\d+)", re.IGNORECASE)
_WORST_RE = re.compile(r"\bworst\b\W{0,3}(?:response\s*)?(?:is\s*)?#?(\d+)", re.IGNORECASE)


def parse_listwise(text: str | None, n: int) -> dict[str, Any]:
    """``{"best": k, "worst": m, "all_equal": bool}`` with 1 <= k, m <= n and k != m unless all equal."""
    if not text or not text.strip():
        raise ParseError("empty answer")
    obj = _json_object(text)
    if obj is None:
        b, w = _BEST_RE.search(text), _WORST_RE.search(text)
        if b is None or w is None:
            raise ParseError("no best/worst in the answer")
        obj = {"best": b.group(1), "worst": w.group(1), "all_equal": False}
    all_equal = obj.get("all_equal", False)
    if not isinstance(all_equal, bool):
        raise ParseError("all_equal: not a boolean")
    if "best" not in obj or "worst" not in obj:
        if all_equal:
            return {"best": None, "worst": None, "all_equal": True}
        raise ParseError("no 'best'/'worst' field")
    best, worst = _as_int(obj["best"], 1, n, "best"), _as_int(obj["worst"], 1, n, "worst")
    if best == worst and not all_equal:
        raise ParseError("best and worst are the same response")
    return {"best": best, "worst": worst, "all_equal": all_equal}


def _rubric_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "rubric_score", "strict": True, "schema": {
        "type": "object", "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
        "required": ["score"], "additionalProperties": False}}}


def _listwise_format(n: int) -> dict:
    pos = {"type": "integer", "enum": list(range(1, n + 1))}
    return {"type": "json_schema", "json_schema": {"name": "best_worst", "strict": True, "schema": {
        "type": "object", "properties": {"best": pos, "worst": pos, "all_equal": {"type": "boolean"}},
        "required": ["best", "worst", "all_equal"], "additionalProperties": False}}}


# ----------------------------------------------------------------------------- requests
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
    failure_reasons: Counter = field(default_factory=Counter)


def shown_order(prompt_id: str, n_or_idx: Sequence[int], seed: int) -> list[int]:
    """The seeded permutation of a group's candidate indices shown to a listwise judge (stable per
    prompt, whatever else is in the run)."""
    order = list(n_or_idx)
    random.Random(f"{seed}:{prompt_id}").shuffle(order)
    return order


def rubric_rates(scores: Iterable[float | int | None]) -> dict[str, float | int | None]:
    """The paper's "5 points" and "4 & 5 points" rates over rubric scores (failed = None, excluded)."""
    valid = [s for s in scores if s is not None]
    n = len(valid)
    return {"five_point_rate": sum(s >= 5 for s in valid) / n if n else None,
            "four_five_point_rate": sum(s >= 4 for s in valid) / n if n else None,
            "n_scored": n}


def _run_coro(coro):
    """asyncio.run, also from a thread that already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
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


# ----------------------------------------------------------------------------- the judge
class LLMJudge:
    def __init__(self, params, min_gap: float = 1e-9, client_factory: Callable[[str], Any] | None = None):
        self.p = params
        self.min_gap = min_gap
        self.name = f"llm-{params.mode}:{params.model}"
        self.cache = JudgeCache(resolve_cache_dir(params.cache_dir))
        self.stats = Stats()
        self._client_factory = client_factory
        self._structured = params.structured_output
        self._secret: str | None = None
        self._bias: dict | None = None

    # --------------------------------------------------------------- building requests
    def _material(self, kind: str, g: Group, texts: list[str]) -> dict:
        return {"model": self.p.model, "mode": kind, "template_version": TEMPLATE_VERSION,
                "template": TEMPLATE_HASH[kind], "prompt": g.question,
                "reference": g.answer if self.p.show_reference else None,
                "candidates": texts, "temperature": self.p.temperature, "max_tokens": self.p.max_tokens}

    def _user_head(self, g: Group) -> str:
        head = USER_QUESTION.format(question=g.question)
        if self.p.show_reference:
            head += USER_REFERENCE.format(answer=g.answer)
        return head

    def rubric_request(self, g: Group, c: CandidateView) -> Request:
        user = self._user_head(g) + USER_RUBRIC.format(response=c.text)
        return Request(cache_key(self._material("rubric", g, [c.text])), "rubric",
                       ({"role": "system", "content": SYSTEM_RUBRIC}, {"role": "user", "content": user}),
                       _rubric_format(), 1, {"prompt_id": g.prompt_id, "candidate_idx": c.idx})

    def listwise_request(self, g: Group, order: list[int]) -> Request:
        by_idx = {c.idx: c for c in g.candidates}
        texts = [by_idx[i].text for i in order]
        user = self._user_head(g) + "".join(USER_LISTWISE_ITEM.format(k=k, response=t)
                                            for k, t in enumerate(texts, 1))
        return Request(cache_key(self._material("listwise", g, texts)), "listwise",
                       ({"role": "system", "content": SYSTEM_LISTWISE}, {"role": "user", "content": user}),
                       _listwise_format(len(texts)), len(texts), {"prompt_id": g.prompt_id, "shown_order": order})

    def plan(self, groups: Sequence[Group]) -> list[Request]:
        """Every request the groups need (groups with fewer than 2 candidates need none)."""
        reqs = []
        for g in groups:
            if len(g.candidates) < 2:
                continue
            if self.p.mode == "rubric":
                reqs += [self.rubric_request(g, c) for c in g.candidates]
            else:
                reqs.append(self.listwise_request(g, shown_order(g.prompt_id, [c.idx for c in g.candidates],
                                                                 self.p.seed)))
        return reqs

    def dry_run(self, groups: Sequence[Group] | None = None, requests: Sequence[Request] | None = None) -> dict:
        """What a run would send: request counts, estimated tokens and cost. Sends nothing."""
        reqs = list({r.key: r for r in (requests if requests is not None else self.plan(groups))}.values())
        to_send = [r for r in reqs if r.key not in self.cache]
        est_in = sum(r.est_input_tokens() for r in to_send)
        typical = sum(TYPICAL_OUTPUT_TOKENS[r.kind] for r in to_send)
        bound = len(to_send) * self.p.max_tokens
        return {"mode": self.p.mode, "model": self.p.model, "requests": len(reqs),
                "cached": len(reqs) - len(to_send), "to_send": len(to_send), "est_input_tokens": est_in,
                "est_output_tokens": typical, "max_output_tokens": bound,
                "est_cost_usd": self._cost(est_in, typical), "max_cost_usd": self._cost(est_in, bound),
                "cache_dir": str(self.cache.dir)}

    # --------------------------------------------------------------- the API
    def _api_key(self) -> str:
        name = self.p.api_key_env
        if name is None:
            return "EMPTY"  # a local server without authentication
        key = os.environ.get(name)
        if not key:
            raise LLMJudgeError(f"judge.llm.api_key_env: the environment variable {name} is not set "
                                "(it must hold the API key; use null for a server without a key)")
        return key

    def redact(self, text: str) -> str:
        if self._secret and len(self._secret) >= 4:
            text = text.replace(self._secret, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        return re.sub(r"\bsk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)

    def _make_client(self):
        key = self._api_key()
        self._secret = key
        if self._client_factory is not None:
            return self._client_factory(key)
        import openai

        return openai.AsyncOpenAI(api_key=key, base_url=self.p.base_url, timeout=self.p.timeout_s,
                                  max_retries=self.p.max_retries)

    async def _call(self, client, sem: asyncio.Semaphore, r: Request) -> tuple[str, Outcome]:
        import openai

        bad_answers = 0
        while True:
            kwargs = {"model": self.p.model, "messages": list(r.messages), "temperature": self.p.temperature,
                      "max_tokens": self.p.max_tokens}
            try:
                async with sem:
                    structured = self._structured  # read once a slot is free: a refusal may have come meanwhile
                    if structured:
                        kwargs["response_format"] = r.response_format
                    resp = await client.chat.completions.create(**kwargs)
                choices = getattr(resp, "choices", None)
                if not choices:
                    raise ValueError("no choices in the response")
                content = choices[0].message.content
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise LLMJudgeError(f"judge.llm: {type(e).__name__} (HTTP {e.status_code}) from "
                                    f"{self.p.base_url or 'the OpenAI API'} for model {self.p.model!r}: "
                                    f"{self.redact(str(e.message))[:300]}") from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                msg = self.redact(str(e.message)).lower()
                if structured and any(w in msg for w in ("response_format", "json_schema", "structured")):
                    if self._structured:
                        self._structured = False
                        log.warning("the endpoint refused structured output (HTTP %d); asking for plain JSON "
                                    "text and parsing it instead", e.status_code)
                    continue
                if structured and not self._structured:
                    continue  # another request switched to plain text meanwhile
                return r.key, self._fail(f"http_{e.status_code}", api=True)
            except openai.APITimeoutError:
                return r.key, self._fail("timeout", api=True)
            except openai.APIConnectionError:
                return r.key, self._fail("connection", api=True)
            except openai.APIStatusError as e:  # 429/5xx after the client's retries, other 4xx
                return r.key, self._fail(f"http_{e.status_code}", api=True)
            except (openai.APIResponseValidationError, ValueError, AttributeError, TypeError, IndexError) as e:
                # A body that is not a chat completion: as malformed as a bad answer.
                self.stats.calls += 1
                bad_answers += 1
                self.stats.parse_failures += 1
                log.warning("malformed response (%s) for %s; attempt %d of %d", type(e).__name__,
                            self._where(r), bad_answers, self.p.max_parse_retries + 1)
                if bad_answers > self.p.max_parse_retries:
                    return r.key, self._fail("malformed_response")
                continue
            self.stats.calls += 1
            usage = self._usage(resp)
            try:
                answer = r.parse(content)
            except ParseError as e:
                bad_answers += 1
                self.stats.parse_failures += 1
                log.warning("malformed answer (%s) for %s; attempt %d of %d", e, self._where(r), bad_answers,
                            self.p.max_parse_retries + 1)
                if bad_answers > self.p.max_parse_retries:
                    return r.key, self._fail("malformed_answer")
                continue
            self.cache.put(r.key, {"answer": answer, "content": content, "usage": usage, "model": self.p.model,
                                   "mode": r.kind, "template_version": TEMPLATE_VERSION, "meta": r.meta})
            return r.key, Outcome(answer)

    @staticmethod
    def _where(r: Request) -> str:
        m = r.meta
        return f"prompt {m.get('prompt_id')}" + (f" candidate {m['candidate_idx']}" if "candidate_idx" in m else "")

    def _fail(self, reason: str, api: bool = False) -> Outcome:
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

    async def _execute_async(self, todo: list[Request], results: dict[str, Outcome]) -> None:
        client = self._make_client()
        sem = asyncio.Semaphore(self.p.max_in_flight)
        tasks = [asyncio.ensure_future(self._call(client, sem, r)) for r in todo]
        step = max(1, len(tasks) // 10)
        try:
            for i, fut in enumerate(asyncio.as_completed(tasks), 1):
                key, outcome = await fut
                results[key] = outcome
                if i % step == 0 or i == len(tasks):
                    log.info("judge requests: %d/%d done (%d failed so far)", i, len(tasks),
                             self.stats.failed_requests)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                await close()

    def execute(self, requests: Sequence[Request]) -> dict[str, Outcome]:
        """Answer every request: from the cache, else from the endpoint (identical requests once)."""
        unique = {r.key: r for r in requests}
        results: dict[str, Outcome] = {}
        todo = []
        for key, r in unique.items():
            rec = self.cache.get(key)
            if rec is None:
                todo.append(r)
                continue
            results[key] = Outcome(rec["answer"], cached=True)
            u = rec.get("usage") or {}
            self.stats.cached_prompt_tokens += int(u.get("prompt_tokens", 0) or 0)
            self.stats.cached_completion_tokens += int(u.get("completion_tokens", 0) or 0)
        self.stats.requests_planned += len(unique)
        self.stats.cache_hits += len(unique) - len(todo)
        plan = self.dry_run(requests=list(unique.values()))
        log.info("LLM judge %s: %d requests, %d cached, %d to send (~%d input tokens, at most %d output "
                 "tokens); cache %s", self.name, plan["requests"], plan["cached"], plan["to_send"],
                 plan["est_input_tokens"], plan["max_output_tokens"], self.cache.dir)
        if todo:
            _run_coro(self._execute_async(todo, results))
        return results

    # --------------------------------------------------------------- verdicts
    def judge(self, groups: Sequence[Group]) -> list[Verdict]:
        reqs = self.plan(groups)
        results = self.execute(reqs)
        planned = len({r.key for r in reqs})
        if planned and self.stats.failed_requests / planned > self.p.max_failed_fraction:
            raise LLMJudgeError(
                f"judge.llm: {self.stats.failed_requests} of {planned} requests failed "
                f"({dict(self.stats.failure_reasons)}), more than max_failed_fraction={self.p.max_failed_fraction}; "
                "no outputs written. Answered requests are cached: rerun to retry only the failed ones.")
        by_group: dict[str, list[Request]] = {}
        for r in reqs:
            by_group.setdefault(r.meta["prompt_id"], []).append(r)
        verdicts = []
        for g in groups:
            if self.p.mode == "rubric":
                verdicts.append(self._rubric_verdict(g, by_group.get(g.prompt_id, []), results))
            else:
                rs = by_group.get(g.prompt_id, [])
                verdicts.append(self._listwise_verdict(g, rs[0] if rs else None, results))
        self._bias = position_bias(verdicts) if self.p.mode == "listwise" else None
        return verdicts

    def _correctness(self, g: Group) -> dict[int, tuple[bool, str | None]]:
        return {c.idx: is_correct(c.text, g.answer)[:2] for c in g.candidates}

    def _rubric_verdict(self, g: Group, reqs: list[Request], results: dict[str, Outcome]) -> Verdict:
        corr = self._correctness(g)
        scores, failures = [], {}
        for c in g.candidates:
            out = next((results[r.key] for r in reqs if r.meta["candidate_idx"] == c.idx), None)
            s = None
            if out is None:
                failures[c.idx] = "too_few_candidates"
            elif out.answer is None:
                failures[c.idx] = out.failure
            else:
                s = float(out.answer["score"])
            scores.append(Score(c.idx, s, *corr[c.idx]))
        lengths = {c.idx: c.num_tokens for c in g.candidates}
        if failures and self.p.on_failure == "drop_group":
            best, worst, status = None, None, "failed"
        else:
            best, worst, status = select_best_worst(scores, lengths, self.min_gap)
        extra = {"mode": "rubric", "failures": {str(k): v for k, v in sorted(failures.items())}}
        return Verdict(g.prompt_id, tuple(scores), best, worst, status, extra)

    def _listwise_verdict(self, g: Group, r: Request | None, results: dict[str, Outcome]) -> Verdict:
        corr = self._correctness(g)
        out = results.get(r.key) if r is not None else None
        order = r.meta["shown_order"] if r is not None else [c.idx for c in g.candidates]
        extra: dict[str, Any] = {"mode": "listwise", "shown_order": order}
        if out is None or out.answer is None:
            extra["failures"] = {str(c.idx): (out.failure if out else "too_few_candidates") for c in g.candidates}
            return Verdict(g.prompt_id, tuple(Score(c.idx, None, *corr[c.idx]) for c in g.candidates),
                           None, None, "failed", extra)
        a = out.answer
        extra.update(failures={}, all_equal=a["all_equal"], best_position=a["best"], worst_position=a["worst"])
        if a["all_equal"]:
            value = {c.idx: 0.0 for c in g.candidates}
        else:
            best_idx, worst_idx = order[a["best"] - 1], order[a["worst"] - 1]
            value = {c.idx: 1.0 if c.idx == best_idx else -1.0 if c.idx == worst_idx else 0.0
                     for c in g.candidates}
        scores = tuple(Score(c.idx, value[c.idx], *corr[c.idx]) for c in g.candidates)
        best, worst, status = select_best_worst(scores, {c.idx: c.num_tokens for c in g.candidates}, self.min_gap)
        return Verdict(g.prompt_id, scores, best, worst, status, extra)

    # --------------------------------------------------------------- evaluate
    def score_candidates(self, groups: Sequence[Group]) -> dict[tuple[str, int], float | None]:
        """Rubric scores 1-5 of every candidate (any group size, whatever ``mode``), None where the judge
        failed; for the evaluate stage with :func:`rubric_rates`. Uses and fills the same cache."""
        reqs = {(g.prompt_id, c.idx): self.rubric_request(g, c) for g in groups for c in g.candidates}
        results = self.execute(list(reqs.values()))
        return {k: (float(results[r.key].answer["score"]) if results[r.key].answer else None)
                for k, r in reqs.items()}

    # --------------------------------------------------------------- metrics
    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.p.prices.get(self.p.model)
        if price is None:
            return None
        return round(prompt_tokens / 1000 * price.input_per_1k + completion_tokens / 1000 * price.output_per_1k, 6)

    @property
    def metrics(self) -> dict:
        s = self.stats
        if self.p.model not in self.p.prices:
            log.warning("judge.llm.prices has no entry for %r: cost not estimated", self.p.model)
        return {"mode": self.p.mode, "model": self.p.model, "requests_planned": s.requests_planned,
                "cache_hits": s.cache_hits, "calls": s.calls, "parse_failures": s.parse_failures,
                "api_failures": s.api_failures, "failed_requests": s.failed_requests,
                "failure_reasons": dict(sorted(s.failure_reasons.items())),
                "structured_output": self._structured,
                "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                # this run's spend (malformed answers included)
                "cost_usd": self._cost(s.prompt_tokens, s.completion_tokens),
                # what the answers taken from the cache cost when they were first asked
                "cost_usd_saved_by_cache": self._cost(s.cached_prompt_tokens, s.cached_completion_tokens),
                "position_bias": self._bias}


def position_bias(verdicts: Sequence[Verdict]) -> dict | None:
    """Where, in the shown (shuffled) order, the listwise judge's picks were. An unbiased judge picks
    position 1 as best about 1/N of the time; ``best_first_excess`` is the observed rate minus that."""
    picks = [v.extra for v in verdicts if v.status == "ok" and v.extra.get("mode") == "listwise"
             and not v.extra.get("all_equal")]
    if not picks:
        return None
    n_max = max(len(e["shown_order"]) for e in picks)
    best_hist, worst_hist = [0] * n_max, [0] * n_max
    for e in picks:
        best_hist[e["best_position"] - 1] += 1
        worst_hist[e["worst_position"] - 1] += 1
    expected_first = sum(1 / len(e["shown_order"]) for e in picks) / len(picks)
    best_first = best_hist[0] / len(picks)
    worst_last = sum(e["worst_position"] == len(e["shown_order"]) for e in picks) / len(picks)
    return {"n_groups": len(picks), "best_position_counts": best_hist, "worst_position_counts": worst_hist,
            "best_first_rate": best_first, "expected_first_rate": expected_first,
            "best_first_excess": best_first - expected_first, "worst_last_rate": worst_last,
            "worst_last_excess": worst_last - expected_first}
