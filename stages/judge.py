"""Stage `judge`: score every candidate and pick the best and the worst per prompt."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.io import read_table, write_json, write_table, write_text
from pipeline.judging.llm.server import JudgeServer
from pipeline.judging.registry import get_judge
from pipeline.judging.types import CandidateView, Group, Judge, Score, Verdict
from pipeline.schema import schema_of
from pipeline.settings.judge import JudgedPairs

log = logging.getLogger("pipeline.judge")

GroupKey = dict[str, tuple[str, str]]  # group id -> (prompt id, source)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the number of requests and the estimated tokens and exit without sending any",
    )
    args = parser.parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the openai client's transport
    # Inputs and params
    params = JudgedPairs.load(args.params).judge
    prompts = read_table(paths.PROMPTS, "prompts")
    # The other model's candidates are empty unless pairs.scenario is 3 or 4.
    candidates = pl.concat([read_table(paths.candidates(src), "candidates") for src in ("policy", "other")])

    # Work
    groups, group_key = candidate_groups(prompts, candidates)
    server = JudgeServer(params, params.backend)  # judge.llm.serve: the judge's own vLLM server, else inert
    judge = get_judge(params.backend, min_gap=params.min_gap, llm=server.llm, **server.judge_kwargs)
    if args.dry_run or (params.backend == "llm" and params.llm.dry_run):
        print_dry_run(judge, groups)
        return
    with server:  # started on the first request to send, stopped here whatever happens
        verdicts = judge.judge(groups)

    # Outputs
    score_rows, sel_rows = table_rows(verdicts, group_key, judge.name)
    scores = write_table(pl.DataFrame(score_rows, schema=schema_of("scores")), paths.SCORES, "scores")
    write_table(pl.DataFrame(sel_rows, infer_schema_length=None), paths.SELECTIONS, "selections")
    metrics = judge_metrics(verdicts, group_key, scores, judge.name)
    if params.backend == "llm":
        from pipeline.judging.llm.judge import LLMJudge  # get_judge imported it for this backend

        assert isinstance(judge, LLMJudge)
        metrics["llm"] = judge.metrics  # usage, cost, failures, cache hits, position bias
        write_judgements(verdicts, group_key)
    elif Path(paths.JUDGEMENTS).exists():
        Path(paths.JUDGEMENTS).unlink()  # a stale log of an earlier LLM run
    write_json(metrics, paths.metrics_file("judge"))
    log.info(
        "judged %d groups: %d kept, %d dropped as ties, %d failed; candidate accuracy %.1f%%",
        len(verdicts),
        metrics["kept"],
        metrics["dropped_tie"],
        metrics["dropped_failed"],
        100 * (metrics["candidate_accuracy"] or 0),
    )


def candidate_groups(prompts: pl.DataFrame, candidates: pl.DataFrame) -> tuple[list[Group], GroupKey]:
    """One group per prompt and source, candidates in index order. A group's id is the prompt id for the
    policy's candidates and "<prompt id>@<source>" for another source's."""
    by_prompt = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    groups: list[Group] = []
    group_key: GroupKey = {}
    for (pid, src), g in candidates.sort("source", "prompt_id", "candidate_idx").group_by(
        "prompt_id", "source", maintain_order=True
    ):
        p = by_prompt.get(pid)
        if p is None:
            raise ValueError(f"{paths.candidates(src)}: prompt_id {pid!r} is not in {paths.PROMPTS}")
        gid = pid if src == "policy" else f"{pid}@{src}"
        group_key[gid] = (pid, src)
        views = tuple(
            CandidateView(r["candidate_idx"], r["text"], r["num_tokens"], r["finish_reason"])
            for r in g.iter_rows(named=True)
        )
        groups.append(Group(gid, p["prompt"], p["answer"], views))
    return groups, group_key


def print_dry_run(judge: Judge, groups: list[Group]) -> None:
    """What a run would send and cost (the judge's own plan; a judge that sends nothing plans nothing)."""
    empty_plan = {"requests": 0, "to_send": 0, "est_input_tokens": 0}
    plan = judge.dry_run(groups) if hasattr(judge, "dry_run") else empty_plan
    print(
        f"dry run ({judge.name}): {plan['to_send']} requests to send of {plan['requests']} "
        f"({plan.get('cached', 0)} cached), ~{plan['est_input_tokens']} input tokens, "
        f"~{plan.get('est_output_tokens', 0)} output tokens (at most {plan.get('max_output_tokens', 0)}), "
        f"estimated cost {plan.get('est_cost_usd')} USD (at most {plan.get('max_cost_usd')}); nothing sent"
    )
    print(json.dumps({"dry_run": plan}, sort_keys=True))


def table_rows(verdicts: list[Verdict], group_key: GroupKey, judge_name: str) -> tuple[list[dict], list[dict]]:
    """The rows of the ``scores`` and ``selections`` tables."""
    score_rows: list[dict] = []
    sel_rows: list[dict] = []
    for v in verdicts:
        pid, src = group_key[v.prompt_id]
        by_idx: dict[int | None, Score] = {s.idx: s for s in v.scores}  # v.best, v.worst: None when failed
        # A candidate the judge failed on has no score row (never a made-up score); it is counted below.
        score_rows += [
            {
                "prompt_id": pid,
                "source": src,
                "candidate_idx": s.idx,
                "score": s.score,
                "correct": s.correct,
                "extracted_answer": s.extracted_answer,
                "judge": judge_name,
            }
            for s in v.scores
            if s.score is not None
        ]
        best, worst = by_idx.get(v.best), by_idx.get(v.worst)
        sel_rows.append(
            {
                "prompt_id": pid,
                "source": src,
                "status": v.status,
                "best_idx": v.best,
                "worst_idx": v.worst,
                "best_score": best.score if best else None,
                "worst_score": worst.score if worst else None,
                "best_correct": best.correct if best else None,
                "worst_correct": worst.correct if worst else None,
            }
        )
    return score_rows, sel_rows


def judge_metrics(verdicts: list[Verdict], group_key: GroupKey, scores: pl.DataFrame, judge_name: str) -> dict:
    """The stage's metrics: the policy's groups kept and dropped, candidate accuracy, failures; the other
    model's groups apart."""
    policy_verdicts = [v for v in verdicts if group_key[v.prompt_id][1] == "policy"]
    status = Counter(v.status for v in policy_verdicts)
    metrics: dict[str, Any] = {
        "judge": judge_name,
        "n_groups": len(policy_verdicts),
        "kept": status.get("ok", 0),
        "dropped_tie": status.get("tie", 0),
        "dropped_failed": status.get("failed", 0),
        "candidate_accuracy": scores.filter(pl.col("source") == "policy")["correct"].cast(pl.Float64).mean(),
        "groups_with_mixed_correctness": sum(1 for v in policy_verdicts if len({s.correct for s in v.scores}) > 1),
        "failed_candidates": sum(s.score is None for v in verdicts for s in v.scores),
    }
    other = [v for v in verdicts if group_key[v.prompt_id][1] != "policy"]
    if other:
        metrics["other"] = {
            "n_groups": len(other),
            "failed": sum(v.status == "failed" for v in other),
            "candidate_accuracy": scores.filter(pl.col("source") != "policy")["correct"].cast(pl.Float64).mean(),
        }
    return metrics


def write_judgements(verdicts: list[Verdict], group_key: GroupKey) -> None:
    """The LLM judge's log: per group, the order the candidates were shown in, the picks and the failures."""
    lines = (
        json.dumps(
            {
                "prompt_id": group_key[v.prompt_id][0],
                "source": group_key[v.prompt_id][1],
                "status": v.status,
                "best_idx": v.best,
                "worst_idx": v.worst,
                "scores": {str(s.idx): s.score for s in v.scores},
                **v.extra,
            },
            sort_keys=True,
        )
        + "\n"
        for v in verdicts
    )
    write_text("".join(lines), paths.JUDGEMENTS)


if __name__ == "__main__":
    run_stage(main)
