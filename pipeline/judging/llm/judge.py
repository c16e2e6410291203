"""The LLM judge (``judge.backend: llm``): requests from groups, the answer cache, verdicts, dry run.

Two modes, both with the rubric of Yan et al., "3D-Properties: Identifying Challenges in DPO and
Charting a Path Forward" (arXiv:2406.07327) (:mod:`.templates`):

- ``rubric``: one request per candidate, scored 1-5. Best = highest score, worst = lowest; ties are
  broken by :func:`pipeline.judging.selection.select_best_worst` (best: shortest, then lowest index;
  worst: longest, then highest index), and a group whose scores are all equal is a ``tie``.
- ``listwise``: one request per group, the candidates shown together in an order shuffled by
  ``seed`` and the prompt id (recorded as ``shown_order``); the judge names the best and the worst
  (or says all are equal: a ``tie``). Scores are +1 (best), -1 (worst), 0 (the others).

Answers are parsed strictly (:mod:`.parsing`) and sent by :class:`.client.JudgeClient`. Valid answers
are cached (:mod:`pipeline.judging.cache`) as soon as they arrive; failures are not cached, so a rerun
asks again for exactly those.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.judging.answers import is_correct
from pipeline.judging.cache import CACHE_ENV, JudgeCache, cache_key
from pipeline.judging.llm.batch import BatchSender
from pipeline.judging.llm.client import JudgeClient, LLMJudgeError, Outcome, Request, Stats
from pipeline.judging.llm.metrics import TYPICAL_OUTPUT_TOKENS, position_bias, run_metrics, send_cost_usd
from pipeline.judging.llm.parsing import listwise_format, rubric_format
from pipeline.judging.llm.templates import (
    SYSTEM_LISTWISE,
    SYSTEM_RUBRIC,
    TEMPLATE_HASH,
    TEMPLATE_VERSION,
    USER_LISTWISE_ITEM,
    USER_QUESTION,
    USER_REFERENCE,
    USER_RUBRIC,
)
from pipeline.judging.selection import select_best_worst
from pipeline.judging.types import CandidateView, Group, Score, Verdict
from pipeline.paths import resolve_cache_dir

if TYPE_CHECKING:
    from pipeline.settings.judge import LLMJudgeParams

log = logging.getLogger("pipeline.judging.llm")


def shown_order(prompt_id: str, n_or_idx: Sequence[int], seed: int) -> list[int]:
    """The seeded permutation of a group's candidate indices shown to a listwise judge (stable per
    prompt, whatever else is in the run)."""
    order = list(n_or_idx)
    random.Random(f"{seed}:{prompt_id}").shuffle(order)
    return order


class LLMJudge:
    """``params``: ``judge.llm``; ``min_gap``: ``judge.min_gap``; ``client_factory``: see
    :class:`.client.JudgeClient`."""

    def __init__(self, params: LLMJudgeParams, min_gap: float, client_factory: Callable[[str], Any] | None = None):
        self.p = params
        self.min_gap = min_gap
        self.name = f"llm-{params.mode}:{params.model}"
        self.cache = JudgeCache(resolve_cache_dir(params.cache_dir, env_var=CACHE_ENV))
        self.stats = Stats()
        self.client = JudgeClient(params, self.cache, self.stats, client_factory)
        self.sender = BatchSender(self.client) if params.batch else self.client  # judge.llm.batch: the Batch API
        self._bias: dict | None = None

    # --------------------------------------------------------------- building requests
    def _material(self, kind: str, g: Group, texts: list[str]) -> dict:
        return {
            "model": self.p.model,
            "mode": kind,
            "template_version": TEMPLATE_VERSION,
            "template": TEMPLATE_HASH[kind],
            "prompt": g.question,
            "reference": g.answer if self.p.show_reference else None,
            "candidates": texts,
            "temperature": self.p.temperature,
            "max_tokens": self.p.max_tokens,
        }

    def _user_head(self, g: Group) -> str:
        head = USER_QUESTION.format(question=g.question)
        if self.p.show_reference:
            head += USER_REFERENCE.format(answer=g.answer)
        return head

    def rubric_request(self, g: Group, c: CandidateView) -> Request:
        user = self._user_head(g) + USER_RUBRIC.format(response=c.text)
        return Request(
            cache_key(self._material("rubric", g, [c.text])),
            "rubric",
            ({"role": "system", "content": SYSTEM_RUBRIC}, {"role": "user", "content": user}),
            rubric_format(),
            1,
            {"prompt_id": g.prompt_id, "candidate_idx": c.idx},
        )

    def listwise_request(self, g: Group, order: list[int]) -> Request:
        by_idx = {c.idx: c for c in g.candidates}
        texts = [by_idx[i].text for i in order]
        user = self._user_head(g) + "".join(USER_LISTWISE_ITEM.format(k=k, response=t) for k, t in enumerate(texts, 1))
        return Request(
            cache_key(self._material("listwise", g, texts)),
            "listwise",
            ({"role": "system", "content": SYSTEM_LISTWISE}, {"role": "user", "content": user}),
            listwise_format(len(texts)),
            len(texts),
            {"prompt_id": g.prompt_id, "shown_order": order},
        )

    def plan(self, groups: Sequence[Group]) -> list[Request]:
        """Every request the groups need (groups with fewer than 2 candidates need none)."""
        reqs = []
        for g in groups:
            if len(g.candidates) < 2:
                continue
            if self.p.mode == "rubric":
                reqs += [self.rubric_request(g, c) for c in g.candidates]
            else:
                reqs.append(
                    self.listwise_request(g, shown_order(g.prompt_id, [c.idx for c in g.candidates], self.p.seed))
                )
        return reqs

    def dry_run(self, groups: Sequence[Group] | None = None, requests: Sequence[Request] | None = None) -> dict:
        """What a run would send: request counts, estimated tokens and cost. Sends nothing."""
        if requests is None:
            if groups is None:
                raise ValueError("dry_run needs the groups or the requests")
            requests = self.plan(groups)
        reqs = list({r.key: r for r in requests}.values())
        to_send = [r for r in reqs if r.key not in self.cache]
        est_in = sum(r.est_input_tokens() for r in to_send)
        typical = sum(TYPICAL_OUTPUT_TOKENS[r.kind] for r in to_send)
        bound = len(to_send) * self.p.max_tokens
        return {
            "mode": self.p.mode,
            "model": self.p.model,
            "requests": len(reqs),
            "cached": len(reqs) - len(to_send),
            "to_send": len(to_send),
            "est_input_tokens": est_in,
            "est_output_tokens": typical,
            "max_output_tokens": bound,
            "est_cost_usd": send_cost_usd(self.p, est_in, typical),
            "max_cost_usd": send_cost_usd(self.p, est_in, bound),
            "cache_dir": str(self.cache.dir),
        }

    # --------------------------------------------------------------- answers
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
            self.stats.count_cached(rec)
        self.stats.requests_planned += len(unique)
        self.stats.cache_hits += len(unique) - len(todo)
        plan = self.dry_run(requests=list(unique.values()))
        log.info(
            "LLM judge %s: %d requests, %d cached, %d to send (~%d input tokens, at most %d output tokens); cache %s",
            self.name,
            plan["requests"],
            plan["cached"],
            plan["to_send"],
            plan["est_input_tokens"],
            plan["max_output_tokens"],
            self.cache.dir,
        )
        if todo:
            self.sender.send(todo, results)
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
                "no outputs written. Answered requests are cached: rerun to retry only the failed ones."
            )
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
        scores: list[Score] = []
        failures: dict[int, str | None] = {}  # an outcome without an answer carries its failure
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
            return Verdict(
                g.prompt_id, tuple(Score(c.idx, None, *corr[c.idx]) for c in g.candidates), None, None, "failed", extra
            )
        a = out.answer
        extra.update(failures={}, all_equal=a["all_equal"], best_position=a["best"], worst_position=a["worst"])
        if a["all_equal"]:
            value = {c.idx: 0.0 for c in g.candidates}
        else:
            best_idx, worst_idx = order[a["best"] - 1], order[a["worst"] - 1]
            value = {c.idx: 1.0 if c.idx == best_idx else -1.0 if c.idx == worst_idx else 0.0 for c in g.candidates}
        scores = tuple(Score(c.idx, value[c.idx], *corr[c.idx]) for c in g.candidates)
        best, worst, status = select_best_worst(scores, {c.idx: c.num_tokens for c in g.candidates}, self.min_gap)
        return Verdict(g.prompt_id, scores, best, worst, status, extra)

    # --------------------------------------------------------------- evaluate
    def score_candidates(self, groups: Sequence[Group]) -> dict[tuple[str, int], float | None]:
        """Rubric scores 1-5 of every candidate (any group size, whatever ``mode``), None where the judge
        failed; for the evaluate stage with :func:`.metrics.rubric_rates`. Uses and fills the same cache."""
        reqs = {(g.prompt_id, c.idx): self.rubric_request(g, c) for g in groups for c in g.candidates}
        results = self.execute(list(reqs.values()))
        answers = {k: results[r.key].answer for k, r in reqs.items()}
        return {k: float(a["score"]) if a else None for k, a in answers.items()}

    # --------------------------------------------------------------- metrics
    @property
    def metrics(self) -> dict:
        """Usage, cost, failures, cache hits and (listwise) position bias of this judge's run so far."""
        return run_metrics(self.p, self.stats, self.client.structured, self._bias)
