"""What the LLM judge reports: rubric rates (evaluate), position bias (listwise), usage and cost.

Imports no HTTP client: the evaluation uses :func:`rubric_rates` without loading one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.judging.types import CandidateView, Group, Verdict

if TYPE_CHECKING:
    import polars as pl

    from pipeline.judging.llm.client import Stats
    from pipeline.settings.judge import LLMJudgeParams

log = logging.getLogger("pipeline.judging.llm")

# A typical answer, for the cost estimate of a dry run (the bound uses max_tokens).
TYPICAL_OUTPUT_TOKENS = {"rubric": 8, "listwise": 20}


def rubric_rates(scores: Iterable[float | int | None]) -> dict[str, float | int | None]:
    """The "5 points" and "4 & 5 points" rates of Yan et al., "3D-Properties: Identifying Challenges in
    DPO and Charting a Path Forward" (arXiv:2406.07327), over rubric scores (failed = None, excluded)."""
    valid = [s for s in scores if s is not None]
    n = len(valid)
    return {
        "five_point_rate": sum(s >= 5 for s in valid) / n if n else None,
        "four_five_point_rate": sum(s >= 4 for s in valid) / n if n else None,
        "n_scored": n,
    }


def position_bias(verdicts: Sequence[Verdict]) -> dict | None:
    """Where, in the shown (shuffled) order, the listwise judge's picks were. An unbiased judge picks
    position 1 as best about 1/N of the time; ``best_first_excess`` is the observed rate minus that."""
    picks = [
        v.extra
        for v in verdicts
        if v.status == "ok" and v.extra.get("mode") == "listwise" and not v.extra.get("all_equal")
    ]
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
    return {
        "n_groups": len(picks),
        "best_position_counts": best_hist,
        "worst_position_counts": worst_hist,
        "best_first_rate": best_first,
        "expected_first_rate": expected_first,
        "best_first_excess": best_first - expected_first,
        "worst_last_rate": worst_last,
        "worst_last_excess": worst_last - expected_first,
    }


def cost_usd(prices: Mapping[str, Any], model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """US dollars at ``prices[model]`` (``judge.llm.prices``); None when the model has no price."""
    price = prices.get(model)
    if price is None:
        return None
    return round(prompt_tokens / 1000 * price.input_per_1k + completion_tokens / 1000 * price.output_per_1k, 6)


def spend_usd(p: LLMJudgeParams, tokens: tuple[int, int], batch_tokens: tuple[int, int]) -> float | None:
    """US dollars for ``tokens`` (prompt, completion), of which ``batch_tokens`` went through the Batch
    API at ``judge.llm.batch_price_factor`` of the price; None when the model has no price."""
    sync = cost_usd(p.prices, p.model, tokens[0] - batch_tokens[0], tokens[1] - batch_tokens[1])
    batch = cost_usd(p.prices, p.model, *batch_tokens)
    return None if sync is None or batch is None else round(sync + p.batch_price_factor * batch, 6)


def send_cost_usd(p: LLMJudgeParams, prompt_tokens: int, completion_tokens: int) -> float | None:
    """What sending these tokens costs in the mode ``judge.llm`` selects (the batch price when ``batch``)."""
    tokens = (prompt_tokens, completion_tokens)
    return spend_usd(p, tokens, tokens if p.batch else (0, 0))


def run_metrics(p: LLMJudgeParams, s: Stats, structured_output: bool, bias: dict | None) -> dict:
    """The ``llm`` section of the judge stage's metrics: requests, failures, tokens, cost, position bias."""
    if p.model not in p.prices:
        log.warning("judge.llm.prices has no entry for %r: cost not estimated", p.model)
    return {
        "mode": p.mode,
        "model": p.model,
        "requests_planned": s.requests_planned,
        "cache_hits": s.cache_hits,
        "calls": s.calls,
        "parse_failures": s.parse_failures,
        "api_failures": s.api_failures,
        "failed_requests": s.failed_requests,
        "failure_reasons": dict(sorted(s.failure_reasons.items())),
        "structured_output": structured_output,
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        # this run's spend (malformed answers included), the Batch API's tokens at the batch price
        "cost_usd": spend_usd(
            p, (s.prompt_tokens, s.completion_tokens), (s.batch_prompt_tokens, s.batch_completion_tokens)
        ),
        # what the answers taken from the cache cost when they were first asked
        "cost_usd_saved_by_cache": spend_usd(
            p,
            (s.cached_prompt_tokens, s.cached_completion_tokens),
            (s.cached_batch_prompt_tokens, s.cached_batch_completion_tokens),
        ),
        "position_bias": bias,
        "batch": {
            "batch_ids": s.batch_ids,
            "prompt_tokens": s.batch_prompt_tokens,
            "completion_tokens": s.batch_completion_tokens,
            "price_factor": p.batch_price_factor,
        }
        if p.batch
        else None,
    }


def rubric_eval(judge, generations: pl.DataFrame, prompts: pl.DataFrame) -> dict:
    """The "5 points" and "4 & 5 points" rates (:func:`rubric_rates`) of the greedy answers in
    ``generations``, each scored 1–5 on its own by the LLM ``judge`` (stage evaluate, ``evaluate.llm_rubric``)."""
    by_id = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    groups = [
        Group(
            r["prompt_id"],
            by_id[r["prompt_id"]]["prompt"],
            by_id[r["prompt_id"]]["answer"],
            (CandidateView(0, r["text"], 0, "stop"),),
        )
        for r in generations.iter_rows(named=True)
    ]
    scores = judge.score_candidates(groups)
    return {**rubric_rates(scores.values()), "failed": sum(v is None for v in scores.values())}
