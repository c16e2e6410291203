"""Stage `judge`: score every candidate and pick the best and the worst per prompt."""

from __future__ import annotations

import logging
from collections import Counter

import polars as pl

from pipeline import paths
from pipeline.cli import setup_logging, stage_parser
from pipeline.config import load_params
from pipeline.io import read_table, write_json, write_table
from pipeline.judges import CandidateView, Group, get_judge

log = logging.getLogger("pipeline.judge")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    setup_logging()
    # Inputs and params
    params = load_params(args.params).judge
    prompts = read_table(paths.PROMPTS, "prompts")
    candidates = read_table(paths.CANDIDATES, "candidates")

    # Work: one group per prompt, candidates in index order
    by_prompt = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    groups = []
    for (pid,), g in candidates.sort("prompt_id", "candidate_idx").group_by("prompt_id", maintain_order=True):
        p = by_prompt[pid]
        groups.append(Group(pid, p["prompt"], p["answer"], tuple(
            CandidateView(r["candidate_idx"], r["text"], r["num_tokens"], r["finish_reason"])
            for r in g.iter_rows(named=True))))
    judge = get_judge(params.backend, min_gap=params.min_gap)
    verdicts = judge.judge(groups)

    # Outputs
    score_rows, sel_rows = [], []
    for v in verdicts:
        by_idx = {s.idx: s for s in v.scores}
        score_rows += [{"prompt_id": v.prompt_id, "candidate_idx": s.idx, "score": s.score, "correct": s.correct,
                        "extracted_answer": s.extracted_answer, "judge": judge.name} for s in v.scores]
        best, worst = by_idx.get(v.best), by_idx.get(v.worst)
        sel_rows.append({"prompt_id": v.prompt_id, "status": v.status,
                         "best_idx": v.best, "worst_idx": v.worst,
                         "best_score": best.score if best else None, "worst_score": worst.score if worst else None,
                         "best_correct": best.correct if best else None,
                         "worst_correct": worst.correct if worst else None})
    scores = write_table(pl.DataFrame(score_rows), paths.SCORES, "scores")
    write_table(pl.DataFrame(sel_rows, infer_schema_length=None), paths.SELECTIONS, "selections")
    status = Counter(v.status for v in verdicts)
    metrics = {"judge": judge.name, "n_groups": len(verdicts), "kept": status.get("ok", 0),
               "dropped_tie": status.get("tie", 0), "dropped_failed": status.get("failed", 0),
               "candidate_accuracy": scores["correct"].cast(pl.Float64).mean(),
               "groups_with_mixed_correctness": sum(
                   1 for v in verdicts if len({s.correct for s in v.scores}) > 1)}
    write_json(metrics, paths.metrics_file("judge"))
    log.info("judged %d groups: %d kept, %d dropped as ties, %d failed; candidate accuracy %.1f%%",
             len(verdicts), metrics["kept"], metrics["dropped_tie"], metrics["dropped_failed"],
             100 * (metrics["candidate_accuracy"] or 0))


if __name__ == "__main__":
    main()
