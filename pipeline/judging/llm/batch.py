"""The OpenAI Batch API for the LLM judge (``judge.llm.batch: true``): submit, resume, poll, collect.

The requests that are not in the answer cache are written as the Batch API's JSONL (:mod:`.batch_format`:
one line per request, its cache key as ``custom_id``, the body the synchronous mode sends) into the
cache folder, uploaded (``files.create(purpose="batch")``; the local copy is then removed) and
submitted (``batches.create``, 24 h window), at most 50,000 requests and 190 MB per batch. The batches
are polled every ``batch_poll_s`` seconds; once one has ended, its output and error files are
downloaded and each answer goes into the same answer cache as a synchronous answer, so a later run in
either mode sends nothing twice. Every call goes through the
official ``openai`` client (:meth:`.client.JudgeClient.make_client`).

Resume: a submitted batch is recorded at once, before it is polled, in ``<cache_dir>/batches/<request
set>.json`` (its id, its input file's id, the endpoint and the cache keys it answers). A run first
looks there: a recorded batch of the same endpoint that answers some of the run's requests is polled
again instead of being submitted again, so a stage that was killed, or stopped waiting after
``batch_timeout_s``, resumes the same batch. A record goes once its batch has ended and its results are
taken, or once every answer it would give is cached. A batch the provider no longer knows, or whose result
file is gone, leaves its requests to a new batch.

Per request, as in the synchronous mode: a valid answer is cached; a malformed answer (or a status 200
without a chat completion) is asked again synchronously, up to ``max_parse_retries`` requests more,
since there are few of them and a second batch would make them wait up to another day; a request the
batch failed (a line of the error file, another status than 200, or no line at all) counts as a
failure, is not cached, and is submitted again by a rerun. ``max_failed_fraction`` applies as usual.

A batch that ends expired, cancelled or failed fails the stage with a message naming it: the answers
it did return are cached and its record is dropped, so a rerun submits only the missing requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io import atomic_path
from pipeline.judging.llm.batch_format import (
    ENDPOINT,
    MAX_BYTES,
    MAX_REQUESTS,
    Result,
    read_results,
    request_line,
    request_set_id,
    split_lines,
)
from pipeline.judging.llm.client import LLMJudgeError, Outcome, Request, run_coro
from pipeline.judging.llm.parsing import ParseError

if TYPE_CHECKING:
    from pipeline.judging.llm.client import JudgeClient

log = logging.getLogger("pipeline.judging.llm")

TERMINAL = ("completed", "expired", "cancelled", "failed")
RECORDS = "batches"  # the folder of batch records in the answer cache (cache entries sit in 2-letter folders)


@dataclass(frozen=True)
class Submitted:
    """A batch this run waits for: its id, the cache keys it answers and its record."""

    batch_id: str
    keys: tuple[str, ...]
    record: Path

    def forget(self) -> None:
        self.record.unlink(missing_ok=True)


class BatchSender:
    """Answers requests through the Batch API of ``client``'s endpoint, into ``client``'s cache and stats."""

    def __init__(self, client: JudgeClient):
        self.client = client
        self.p = client.p
        self.records = client.cache.dir / RECORDS
        self.endpoint = self.p.base_url or "https://api.openai.com/v1"

    def send(self, todo: Sequence[Request], results: dict[str, Outcome]) -> None:
        """Answer every request of ``todo`` (distinct keys); each outcome goes into ``results`` under its key."""
        import openai

        try:
            again = run_coro(self._run(todo, results))
        except openai.APIError as e:
            status = getattr(e, "status_code", None)
            raise LLMJudgeError(
                f"judge.llm.batch: {type(e).__name__}{f' (HTTP {status})' if status else ''} from {self.endpoint}: "
                f"{self.client.redact(str(e.message))[:300]}. Submitted batches keep running; a rerun resumes "
                f"them (records in {self.records}). No outputs written."
            ) from None
        if again:
            log.info("asking %d malformed batch answers again, one request at a time", len(again))
            self.client.send(again, results, bad_answers=1)

    async def _run(self, todo: Sequence[Request], results: dict[str, Outcome]) -> list[Request]:
        by_key = {r.key: r for r in todo}
        api = self.client.make_client()
        try:
            active = await self._resume(api, set(by_key))
            covered = {k for s in active for k in s.keys}
            active += await self._submit(api, [r for r in todo if r.key not in covered])
            self.client.stats.batch_ids += [s.batch_id for s in active]
            return await self._wait(api, active, by_key, results)
        finally:
            close = getattr(api, "close", None)
            if close is not None:
                await close()

    # --------------------------------------------------------------- submit and resume
    async def _resume(self, api, wanted: set[str]) -> list[Submitted]:
        """The recorded batches of this endpoint that answer some of ``wanted``; records whose every answer
        is cached are dropped."""
        import openai

        active = []
        for path in sorted(self.records.glob("*.json")):
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                sub = Submitted(rec["batch_id"], tuple(rec["keys"]), path)
                endpoint = rec["endpoint"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable batch record (%s); ignored", path, type(e).__name__)
                continue
            if endpoint != self.endpoint:
                continue
            if not wanted.intersection(sub.keys):
                if all(k in self.client.cache for k in sub.keys):
                    sub.forget()
                continue
            try:
                batch = await api.batches.retrieve(sub.batch_id)
            except openai.NotFoundError:
                log.warning(
                    "batch %s (%s) is unknown to %s: its requests go into a new batch", sub.batch_id, path, endpoint
                )
                sub.forget()
                continue
            log.info(
                "resuming batch %s (%s, %d requests) instead of submitting it again",
                batch.id,
                batch.status,
                len(sub.keys),
            )
            active.append(sub)
        return active

    async def _submit(self, api, todo: list[Request]) -> list[Submitted]:
        lines = [request_line(r.key, self.client.body(r, self.client.structured)) + "\n" for r in todo]
        parts = split_lines([len(x.encode("utf-8")) for x in lines], MAX_REQUESTS, MAX_BYTES)
        return [await self._submit_one(api, todo[part], lines[part]) for part in parts]

    async def _submit_one(self, api, todo: list[Request], lines: list[str]) -> Submitted:
        keys = tuple(r.key for r in todo)
        set_id = request_set_id(keys)
        record = self.records / f"{set_id}.json"
        jsonl = record.with_suffix(".jsonl")
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(jsonl) as tmp:
                tmp.write_text("".join(lines), encoding="utf-8")
            upload = await api.files.create(file=jsonl, purpose="batch")
        finally:
            jsonl.unlink(missing_ok=True)  # the provider keeps it (input_file_id) for the batch's life
        batch = await api.batches.create(
            input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h", metadata={"request_set": set_id}
        )
        rec = {"batch_id": batch.id, "input_file_id": upload.id, "endpoint": self.endpoint, "model": self.p.model}
        with atomic_path(record, fsync=True) as tmp:
            tmp.write_text(json.dumps({**rec, "submitted_at": time.time(), "keys": keys}), encoding="utf-8")
        log.info("submitted batch %s: %d requests (input file %s, record %s)", batch.id, len(keys), upload.id, record)
        return Submitted(batch.id, keys, record)

    # --------------------------------------------------------------- poll and collect
    async def _wait(
        self, api, active: list[Submitted], by_key: dict[str, Request], results: dict[str, Outcome]
    ) -> list[Request]:
        """Poll until every batch has ended (or ``batch_timeout_s``), collecting each as it ends; the requests
        to ask again synchronously."""
        deadline = time.monotonic() + self.p.batch_timeout_s
        pending = {s.batch_id: s for s in active}
        again: list[Request] = []
        ended: list[str] = []
        shown: dict[str, tuple] = {}
        while True:
            for sub in list(pending.values()):
                batch = await api.batches.retrieve(sub.batch_id)
                self._progress(batch, shown)
                if batch.status not in TERMINAL:
                    continue
                del pending[sub.batch_id]
                files = [await self._download(api, batch.id, f) for f in (batch.output_file_id, batch.error_file_id)]
                again += self.absorb([f for f in files if f], batch.id, sub.keys, by_key, results)
                if batch.status != "completed":
                    ended.append(self._ended(batch, sub, results))
                sub.forget()
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            await asyncio.sleep(min(self.p.batch_poll_s, left))
        if pending:
            raise LLMJudgeError(
                f"judge.llm.batch: batch(es) {', '.join(sorted(pending))} not finished after batch_timeout_s="
                f"{self.p.batch_timeout_s:g} s; they keep running at the provider. Rerun the stage to resume polling "
                f"them (records in {self.records}). No outputs written."
            )
        if ended:
            raise LLMJudgeError(
                f"judge.llm.batch: {'; '.join(ended)}. The answers returned are cached and the batch records "
                "dropped: rerun the stage to submit only the missing requests as a new batch. No outputs written."
            )
        return again

    @staticmethod
    async def _download(api, batch_id: str, file_id: str | None) -> tuple[str, str] | None:
        """A result file as ``(id, text)``; None when there is none or the provider no longer has it (its
        requests then count as failed, and a rerun submits them again)."""
        import openai

        if not file_id:
            return None
        try:
            return file_id, (await api.files.content(file_id)).text
        except openai.NotFoundError:
            log.warning(
                "batch %s: result file %s is gone at the provider; its requests count as failed", batch_id, file_id
            )
            return None

    @staticmethod
    def _progress(batch: Any, shown: dict[str, tuple]) -> None:
        rc = batch.request_counts
        now = (batch.status, *((rc.completed, rc.failed, rc.total) if rc else (None, None, None)))
        if shown.get(batch.id) != now:
            shown[batch.id] = now
            log.info("batch %s: %s, %s of %s requests done, %s failed", batch.id, now[0], now[1], now[3], now[2])

    def _ended(self, batch: Any, sub: Submitted, results: dict[str, Outcome]) -> str:
        answered = sum(1 for k in sub.keys if k in results and results[k].answer is not None)
        what = {
            "expired": "expired (not finished within its 24 h window)",
            "cancelled": "was cancelled",
            "failed": "failed",
        }[batch.status]
        errors = getattr(getattr(batch, "errors", None), "data", None) or []
        detail = "; ".join(f"{getattr(e, 'code', None)}: {getattr(e, 'message', None)}" for e in errors[:3])
        detail = f": {self.client.redact(detail)[:300]}" if detail else ""
        return f"batch {batch.id} {what}{detail} ({answered} of {len(sub.keys)} requests answered)"

    def absorb(
        self,
        files: list[tuple[str, str]],
        batch_id: str,
        keys: Sequence[str],
        by_key: dict[str, Request],
        results: dict[str, Outcome],
    ) -> list[Request]:
        """Take the result files (``(name, text)``) of batch ``batch_id``, which answers ``keys``: an outcome
        into ``results`` for each of ``keys`` that is in ``by_key``; the requests to ask again."""
        wanted = {k for k in keys if k in by_key and k not in results}  # not answered by another batch
        seen: set[str] = set()
        again = []
        for name, text in files:
            found, problems = read_results(text, f"batch {batch_id} file {name}")
            for problem in problems:
                log.warning("%s (its request counts as failed)", problem)
            for x in found:
                if x.custom_id not in wanted or x.custom_id in seen:
                    if x.custom_id not in keys:
                        log.warning(
                            "batch %s file %s: custom_id %r is not one of its requests", batch_id, name, x.custom_id
                        )
                    continue
                seen.add(x.custom_id)
                outcome = self._take(by_key[x.custom_id], x, batch_id)
                if outcome is None:
                    again.append(by_key[x.custom_id])
                else:
                    results[x.custom_id] = outcome
        for key in sorted(wanted - seen):
            results[key] = self.client.fail("batch_missing", api=True)
        return again

    def _take(self, r: Request, x: Result, batch_id: str) -> Outcome | None:
        """The outcome of one result line; None: a malformed answer with a retry left."""
        c = self.client
        if x.failure is not None and x.failure != "malformed_response":
            return c.fail(x.failure, api=True)
        c.stats.calls += 1
        pt, ct = x.usage["prompt_tokens"], x.usage["completion_tokens"]
        c.stats.prompt_tokens += pt
        c.stats.completion_tokens += ct
        c.stats.batch_prompt_tokens += pt
        c.stats.batch_completion_tokens += ct
        what = "response" if x.failure else "answer"
        try:
            if x.failure:
                raise ParseError("not a chat completion")
            answer = r.parse(x.content)
        except ParseError as e:
            return c.fail(f"malformed_{what}") if c.malformed(what, e, r, 1) else None
        c.keep(r, answer, x.content, x.usage, batch_id)
        return Outcome(answer)
