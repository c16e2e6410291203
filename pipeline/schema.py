"""The columns and types of every table that passes between stages.

Stages write tables with :func:`pipeline.io.write_table` and read them with
:func:`pipeline.io.read_table`, which validates against the schemas here. A missing column, a
wrong type or a null in a required field raises :class:`SchemaError` naming the file, the row and
the field.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

IDS = pl.List(pl.Int32)
MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))  # chat messages (pairs_trl)


@dataclass(frozen=True)
class Column:
    dtype: pl.DataType | type[pl.DataType]  # an instance (pl.List(pl.Int32)) or a class (pl.String)
    nullable: bool = False


C = Column

TABLES: dict[str, dict[str, Column]] = {
    # prepare -> everything downstream. One row per problem.
    "prompts": {
        "prompt_id": C(pl.String),
        "split": C(pl.String),  # train | test | warmup | val
        "question": C(pl.String),
        "prompt": C(pl.String),  # question plus the answer-format instruction; what the model sees
        "answer": C(pl.String),  # gold final answer
        "solution": C(pl.String, nullable=True),  # gold worked solution, used by warm-up and scenario 2
        "source": C(pl.String),
    },
    # sample: N candidates per prompt.
    "candidates": {
        "prompt_id": C(pl.String),
        "candidate_idx": C(pl.Int32),
        "text": C(pl.String),
        "token_ids": C(IDS),
        "num_tokens": C(pl.Int32),
        "logprob_sum": C(pl.Float64),  # summed log-prob of the sampled tokens under the sampler
        "finish_reason": C(pl.String),  # stop | length
        "source": C(pl.String),  # policy | other
        "model": C(pl.String),  # model folder fingerprint the candidate was sampled from
    },
    # judge: one score per candidate (a candidate is (prompt_id, source, candidate_idx)).
    "scores": {
        "prompt_id": C(pl.String),
        "source": C(pl.String),  # policy | other
        "candidate_idx": C(pl.Int32),
        "score": C(pl.Float64),
        "correct": C(pl.Boolean, nullable=True),
        "extracted_answer": C(pl.String, nullable=True),
        "judge": C(pl.String),
    },
    # judge: best and worst per group (a prompt's candidates from one source);
    # status ok | tie (all equally good or bad) | failed.
    "selections": {
        "prompt_id": C(pl.String),
        "source": C(pl.String),  # policy | other
        "status": C(pl.String),
        "best_idx": C(pl.Int32, nullable=True),
        "worst_idx": C(pl.Int32, nullable=True),
        "best_score": C(pl.Float64, nullable=True),
        "worst_score": C(pl.Float64, nullable=True),
        "best_correct": C(pl.Boolean, nullable=True),
        "worst_correct": C(pl.Boolean, nullable=True),
    },
    # pairs: chosen/rejected with tags; token ids are what training and the reference see.
    "pairs": {
        "pair_id": C(pl.String),
        "prompt_id": C(pl.String),
        "split": C(pl.String),  # train | heldout
        "prompt_ids": C(IDS),
        "chosen_ids": C(IDS),
        "rejected_ids": C(IDS),
        "chosen_text": C(pl.String),
        "rejected_text": C(pl.String),
        "chosen_source": C(pl.String),  # policy | gold | other | imported
        "rejected_source": C(pl.String),  # the same, or edit:<kind> (pairs.source constructed, data/edits.py)
        "chosen_correct": C(pl.Boolean, nullable=True),
        "rejected_correct": C(pl.Boolean, nullable=True),
        "chosen_sampler_logprob": C(pl.Float64, nullable=True),  # under the model that sampled it; null for gold
        "rejected_sampler_logprob": C(pl.Float64, nullable=True),
        # Under the starting policy: how on-policy each side is (policy samples: ~ the sampler's own).
        "chosen_policy_logprob": C(pl.Float64),
        "rejected_policy_logprob": C(pl.Float64),
        "scenario": C(pl.Int8),  # 1-4: the 3D-properties paper's; 0: none of them (constructed, imported)
        "edit_distance": C(pl.Int32),  # token-level Levenshtein distance
        "edit_distance_norm": C(pl.Float64),  # / max(len_w, len_l)
        "first_diff": C(pl.Int32),  # first differing token position (= min length if one is a prefix)
        "len_w": C(pl.Int32),
        "len_l": C(pl.Int32),
        # CHES under the starting policy, and length-normalised (pipeline/data/ches.py)
        "ches": C(pl.Float64),
        "ches_norm": C(pl.Float64),
    },
    # pairs -> users: the pairs in TRL's conversational preference format (prompt, chosen, rejected) plus
    # our tags, one file per split (pipeline/data/trl_format.py); what a `pairs.source` file may hold.
    "pairs_trl": {
        "prompt": C(MESSAGES),  # ending with the user's turn
        "chosen": C(MESSAGES),  # one assistant message
        "rejected": C(MESSAGES),
        "pair_id": C(pl.String),
        "prompt_id": C(pl.String),
        "scenario": C(pl.Int8),  # 1-4 as in `pairs`; 0: constructed, or imported from a file that did not say
        "chosen_source": C(pl.String),  # policy | gold | other | imported (rejected also edit:<kind>)
        "rejected_source": C(pl.String),
        "chosen_correct": C(pl.Boolean, nullable=True),
        "rejected_correct": C(pl.Boolean, nullable=True),
        "score_chosen": C(pl.Float64, nullable=True),  # the judge's score (UltraFeedback's names); null for gold
        "score_rejected": C(pl.Float64, nullable=True),
        "chosen_sampler_logprob": C(pl.Float64, nullable=True),
        "rejected_sampler_logprob": C(pl.Float64, nullable=True),
        "chosen_policy_logprob": C(pl.Float64),
        "rejected_policy_logprob": C(pl.Float64),
        "edit_distance": C(pl.Int32),
        "edit_distance_norm": C(pl.Float64),
        "first_diff": C(pl.Int32),
        "len_w": C(pl.Int32),
        "len_l": C(pl.Int32),
        # The policy tokenizer's ids of each side (sampled ids need not be the text's tokenization); not
        # TRL's prompt_ids/chosen_ids names, which would pass as the ids of whatever model loads the file.
        "chosen_token_ids": C(IDS),
        "rejected_token_ids": C(IDS),
    },
    # reference: log-probs under the frozen reference model, computed once.
    "reference": {
        "pair_id": C(pl.String),
        "ref_w": C(pl.Float64),
        "ref_l": C(pl.Float64),
        "len_w": C(pl.Int32),
        "len_l": C(pl.Int32),
    },
    # evaluate: per held-out pair, before (reference) and after (trained policy).
    "pair_eval": {
        "pair_id": C(pl.String),
        "variant": C(pl.String),
        "ref_w": C(pl.Float64),
        "ref_l": C(pl.Float64),
        "lp_w": C(pl.Float64),
        "lp_l": C(pl.Float64),
        "len_w": C(pl.Int32),
        "len_l": C(pl.Int32),
        "edit_distance_norm": C(pl.Float64),
        "distance_bucket": C(pl.String),
        "ches": C(pl.Float64),
        "ches_norm": C(pl.Float64),
    },
    # train -> report: the fixed sets (every held-out pair, a fixed subset of training pairs) scored at step 0
    # (the policy before any update), every train.eval_every steps and after the last. One row per pair and step.
    "fixed_curves": {
        "step": C(pl.Int64),  # optimiser steps done
        "set": C(pl.String),  # heldout | train
        "pair_id": C(pl.String),
        "lp_w": C(pl.Float64),
        "lp_l": C(pl.Float64),
        "ref_w": C(pl.Float64),
        "ref_l": C(pl.Float64),
        "len_w": C(pl.Int32),
        "len_l": C(pl.Int32),
        # log10 |dL/dpi(y_l)| / |dL/dpi(y_w)| of the pair's own loss; null where a side's gradient is 0
        "log10_grad_ratio": C(pl.Float64, nullable=True),
    },
    # train -> report: the probe prompts' greedy decode (squeezing), one row per prompt and step.
    "probe_curves": {
        "step": C(pl.Int64),
        "probe": C(pl.String),  # the prompt's prompt_id
        "greedy_lp": C(pl.Float64),  # summed log-prob of the greedy decode under the current policy
        "n_tokens": C(pl.Int32),
    },
    # policy / evaluate: greedy answers on the test prompts.
    "generations": {
        "prompt_id": C(pl.String),
        "model": C(pl.String),
        "text": C(pl.String),
        "extracted_answer": C(pl.String, nullable=True),
        "correct": C(pl.Boolean),
    },
}
# the study flow's report: every run's held-out pairs (pair_eval) with the experiment, seed and pair set.
TABLES["study_pairs"] = {
    **TABLES["pair_eval"],
    "experiment": C(pl.String),
    "seed": C(pl.Int64),
    "pair_set": C(pl.String),
}


class SchemaError(ValueError):
    """A table that does not match its schema; the message names file, row and field."""


def schema_of(table: str) -> dict[str, pl.DataType | type[pl.DataType]]:
    return {name: col.dtype for name, col in TABLES[table].items()}


def empty(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema=schema_of(table))


def conform(df: pl.DataFrame, table: str, where: str = "<memory>") -> pl.DataFrame:
    """Check ``df`` against ``table``'s schema, cast to the exact dtypes and order the columns.

    Raises :class:`SchemaError` naming ``where`` (usually the file), the first bad row and field.
    """
    spec = TABLES[table]
    missing = [c for c in spec if c not in df.columns]
    if missing:
        raise SchemaError(f"{where}: table '{table}' is missing column(s) {missing}")
    out = {}
    for name, col in spec.items():
        s = df.get_column(name)
        if s.dtype != col.dtype:
            try:
                cast = s.cast(col.dtype, strict=True)
            except Exception:  # noqa: BLE001 - polars raises several types; find the row below
                cast = s.cast(col.dtype, strict=False)
            bad = cast.is_null() & s.is_not_null()
            if bad.any():
                row = _first_true(bad)
                raise SchemaError(f"{where}: row {row}, field '{name}': expected {col.dtype}, got {s[row]!r}")
            s = cast
        if not col.nullable and s.null_count():
            row = _first_true(s.is_null())
            raise SchemaError(f"{where}: row {row}, field '{name}': null in a required field")
        out[name] = s
    return pl.DataFrame(out)


def _first_true(mask: pl.Series) -> int:
    """The row of the first True of a boolean column that has one."""
    return int(mask.arg_true()[0])
