"""Stage `pairs`: chosen/rejected pairs tagged with edit distance, sources and scenario, also written in
TRL's preference format.

Inputs:  ``pairs.source`` ``judged`` or ``constructed``: data/prompts.parquet, the candidates and the judge's
         picks and scores (data/judge); else the pairs file or folder it names (TRL format,
         pipeline/data/trl_format.py).
         Both: models/policy (tokenizer, and each side's log-prob under the starting policy).
Work:    pairs from the judge's picks, constructed (a correct response and a controlled edit of it), or
         from the file; each tagged with edit distance, sources, scenario, each
         side's log-prob and CHES under the starting policy; ``pairs.filter`` drops the training pairs of
         highest CHES.
Outputs: data/pairs.parquet (table ``pairs``); data/pairs_trl/{jsonl,parquet}/{train,test}.* (table
         ``pairs_trl``, `datasets.load_dataset` reads each folder); data/pairs_quarantine.jsonl (a pairs
         file's quarantined rows, always written, possibly empty); metrics/pairs.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import polars as pl

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.data import trl_format
from pipeline.data.ches import filter_by_ches
from pipeline.data.pair_summary import summarise_pairs
from pipeline.data.pairs import (
    PairSettings,
    PolicyTags,
    build_constructed_pairs,
    build_imported_pairs,
    build_pairs,
    judge_scores,
)
from pipeline.io import atomic_path, read_table, write_json, write_table
from pipeline.model import loading
from pipeline.model.logprobs import response_logprobs_and_hidden
from pipeline.settings.judge import JudgedPairs
from pipeline.settings.policy import PolicyParams
from pipeline.settings.train import ReferenceParams

log = logging.getLogger("pipeline.data.pairs")


class Settings(JudgedPairs):
    """The sections of params.yaml this stage reads."""

    reference: ReferenceParams
    policy: PolicyParams


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params
    cfg = Settings.load(args.params)
    params = cfg.pairs
    built = params.source in (trl_format.JUDGED, trl_format.CONSTRUCTED)  # from our own stages' outputs
    if built and [os.path.normpath(p) for p in params.inputs] != trl_format.judged_inputs():
        raise ValueError(
            f"{args.params}: pairs.inputs: must be {trl_format.judged_inputs()} when pairs.source is "
            f"{params.source!r} (the stage's DVC deps: the candidates and the judge's picks)"
        )
    policy, tokenizer = loading.load_policy(paths.POLICY_DIR, cfg.policy.dtype, loading.device_for())

    def policy_tags(prompt_ids, response_ids):  # truncated as training truncates
        return response_logprobs_and_hidden(
            policy,
            prompt_ids,
            response_ids,
            tokenizer.pad_token_id,
            cfg.reference.batch_size,
            cfg.reference.max_length,
            progress="policy log-probs and hidden states",
        )

    # Work: the scenario's pairs from the judge's picks, constructed pairs, or the file's pairs; each side
    # tagged with its log-prob under the starting policy and each pair with its CHES (one forward per side)
    source = built_pairs(cfg, tokenizer, policy_tags) if built else imported_pairs(cfg, tokenizer, policy_tags)
    pairs, skipped, quarantine = source.pairs, source.skipped, source.quarantine
    # pairs.filter drops the training pairs of highest CHES
    pairs, filtered = filter_by_ches(pairs, params.filter.by, params.filter.ches_top_percent)
    trl = trl_format.export_frame(pairs, source.prompt_messages, source.pair_scores)

    # Outputs
    pairs = write_table(pairs, paths.PAIRS, "pairs")
    exported = trl_format.write_export(trl, pairs["split"], paths.PAIRS_TRL)
    with atomic_path(paths.PAIRS_QUARANTINE) as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), encoding="utf-8")
    metrics = {
        "source": params.source,
        "scenario": (
            params.scenario if params.source == trl_format.JUDGED else params.source if built else trl_format.IMPORTED
        ),
        **summarise_pairs(pairs, params.distance_buckets),
        "skipped": skipped,
        "rows_read": source.rows_read,
        "filtered": filtered,
        "exported": exported,
        "quarantined": {
            "total": len(quarantine),
            "by_reason": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        },
    }
    write_json(metrics, paths.metrics_file("pairs"))
    n_train = metrics["n_train"]
    log.info(
        "built %d pairs (%s: %d train, %d held out); skipped %s",
        len(pairs),
        f"scenario {params.scenario}" if params.source == trl_format.JUDGED else f"from {params.source}",
        n_train,
        len(pairs) - n_train,
        skipped or "none",
    )
    if quarantine:
        log.warning(
            "%d bad pair row(s) quarantined (%s), see %s",
            len(quarantine),
            ", ".join(f"{k}: {v}" for k, v in metrics["quarantined"]["by_reason"].items()),
            paths.PAIRS_QUARANTINE,
        )
    if n_train == 0:
        if params.source == trl_format.JUDGED:
            advice = "sample more candidates (sample.n), raise sample.temperature, or try another pairs.scenario"
        elif built:
            advice = "add gold to pairs.constructed.chosen, or raise prepare.n_train"
        else:
            advice = f"{params.source} holds too few prompts for pairs.heldout_fraction"
        raise ValueError(f"{paths.PAIRS}: no training pairs (skipped: {skipped}); {advice}")


@dataclass
class SourcePairs:
    """The pairs before ``pairs.filter``, with what the TRL export and the metrics need of their source."""

    pairs: pl.DataFrame
    skipped: dict
    prompt_messages: dict  # prompt id -> the prompt's chat messages
    pair_scores: dict  # pair id -> (chosen score, rejected score)
    quarantine: list[dict] = field(default_factory=list)  # a pairs file's bad rows
    rows_read: int | None = None  # a pairs file's rows


def built_pairs(cfg: Settings, tokenizer, policy_tags: PolicyTags) -> SourcePairs:
    """The scenario's pairs from the judge's picks, or constructed pairs (a correct response and an edit)."""
    params = cfg.pairs
    prompts = read_table(paths.PROMPTS, "prompts")
    candidates = pl.concat([read_table(paths.candidates(src), "candidates") for src in ("policy", "other")])
    scores = read_table(paths.SCORES, "scores")
    selections = read_table(paths.SELECTIONS, "selections")
    settings = PairSettings.from_params(params, cfg.judge)
    if params.source == trl_format.CONSTRUCTED:
        pairs, skipped = build_constructed_pairs(prompts, candidates, scores, tokenizer, policy_tags, settings)
    else:
        pairs, skipped = build_pairs(prompts, candidates, scores, selections, tokenizer, policy_tags, settings)
    prompt_messages = {
        r["prompt_id"]: [{"role": "user", "content": r["prompt"]}] for r in prompts.iter_rows(named=True)
    }
    # constructed pairs' rejected were never judged: their scores stay null in the export
    pair_scores = judge_scores(pairs, selections) if params.source == trl_format.JUDGED else {}
    return SourcePairs(pairs, skipped, prompt_messages, pair_scores)


def imported_pairs(cfg: Settings, tokenizer, policy_tags: PolicyTags) -> SourcePairs:
    """The pairs of the file or folder ``pairs.source`` names, tagged as ours are."""
    params = cfg.pairs
    rows, quarantine, rows_read = trl_format.read_pairs_file(params.source, tokenizer, params.on_bad_rows)
    return SourcePairs(
        build_imported_pairs(rows, params.heldout_fraction, params.seed, policy_tags),
        {},
        {r["prompt_id"]: r["prompt"] for r in rows},
        {r["pair_id"]: (r["score_chosen"], r["score_rejected"]) for r in rows},
        quarantine,
        rows_read,
    )


if __name__ == "__main__":
    run_stage(main)
