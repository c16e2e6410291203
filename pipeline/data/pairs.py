"""Chosen/rejected pairs from judged candidates, for one of the data scenarios of the 3D-properties
paper (Yan et al. 2024, arXiv 2406.07327), constructed from a correct response and a controlled edit of it
(:func:`build_constructed_pairs`), or read from a pairs file (:func:`build_imported_pairs`), tagged alike."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from pipeline.data import edits, tagging
from pipeline.data.trl_format import IMPORTED, SCENARIO_IMPORTED
from pipeline.model.encoding import encode_prompt, encode_response

if TYPE_CHECKING:
    import torch

EDIT_SOURCE = "edit"  # rejected_source of constructed pairs: edit:<kind>
# (prompt ids, response ids) -> per response: summed log-prob, hidden-state sum [N, d] and token count [N]
# under the starting policy (pipeline.model.logprobs.response_logprobs_and_hidden, truncated as training is)
PolicyTags = Callable[[list[list[int]], list[list[int]]], tuple[list[float], "torch.Tensor", "torch.Tensor"]]


def is_heldout(prompt_id: str, fraction: float, seed: int) -> bool:
    """Stable split by prompt: the same prompt is held out whatever else is in the set."""
    h = int(hashlib.sha1(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


@dataclass(frozen=True)
class PairSettings:
    """What decides the pairs built from our own stages' outputs: ``pairs`` of params.yaml, and the judge's
    ``min_gap`` (scenario 3's least score gap between the chosen and the rejected)."""

    scenario: int
    heldout_fraction: float
    seed: int
    min_gap: float
    chosen_from: tuple[str, ...]  # constructed pairs: the chosen's sources, the first with a correct response
    edit_kinds: tuple[str, ...]  # constructed pairs: the edits the prompts of a split take in turn

    @classmethod
    def from_params(cls, pairs, judge) -> PairSettings:
        return cls(
            pairs.scenario,
            pairs.heldout_fraction,
            pairs.seed,
            judge.min_gap,
            tuple(pairs.constructed.chosen),
            tuple(pairs.constructed.edits),
        )

    def split_of(self, prompt_id: str) -> str:
        return "heldout" if is_heldout(prompt_id, self.heldout_fraction, self.seed) else "train"


@dataclass(frozen=True)
class Side:
    """One response of a pair: its tokens and text, where it comes from, whether it is correct (None: not
    known) and its log-prob under the model that sampled it (None: not sampled)."""

    ids: list[int]
    text: str
    source: str
    correct: bool | None
    sampler_logprob: float | None


def _row(
    pair_id: str, prompt_id: str, split: str, prompt_ids: list[int], chosen: Side, rejected: Side, scenario: int
) -> dict:
    """One row of the ``pairs`` table, before the starting policy's tags (:func:`_tag_under_policy`)."""
    return {
        "pair_id": pair_id,
        "prompt_id": prompt_id,
        "split": split,
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen.ids,
        "rejected_ids": rejected.ids,
        "chosen_text": chosen.text,
        "rejected_text": rejected.text,
        "chosen_source": chosen.source,
        "rejected_source": rejected.source,
        "chosen_correct": chosen.correct,
        "rejected_correct": rejected.correct,
        "chosen_sampler_logprob": chosen.sampler_logprob,
        "rejected_sampler_logprob": rejected.sampler_logprob,
        "scenario": scenario,
        **token_tags(chosen.ids, rejected.ids),
    }


# --------------------------------------------------------------------------------------------- judged pairs
@dataclass(frozen=True)
class _Judged:
    """The judge's inputs and outputs by key: prompts by prompt_id, candidates and scores by (prompt_id,
    source, candidate_idx), selections by (prompt_id, source)."""

    prompts: dict[str, dict]
    candidates: dict[tuple[str, str, int], dict]
    scores: dict[tuple[str, str, int], dict]
    selections: dict[tuple[str, str], dict]

    @classmethod
    def index(
        cls, prompts: pl.DataFrame, candidates: pl.DataFrame, scores: pl.DataFrame, selections: pl.DataFrame
    ) -> _Judged:
        def key(r: dict) -> tuple[str, str, int]:
            return r["prompt_id"], r["source"], r["candidate_idx"]

        return cls(
            {r["prompt_id"]: r for r in prompts.iter_rows(named=True)},
            {key(r): r for r in candidates.iter_rows(named=True)},
            {key(r): r for r in scores.iter_rows(named=True)},
            {(r["prompt_id"], r["source"]): r for r in selections.iter_rows(named=True)},
        )


def build_pairs(
    prompts: pl.DataFrame,
    candidates: pl.DataFrame,
    scores: pl.DataFrame,
    selections: pl.DataFrame,
    tokenizer,
    policy_tags: PolicyTags,
    settings: PairSettings,
) -> tuple[pl.DataFrame, dict]:
    """One pair per usable prompt; returns the pairs table and counts of what was skipped and why.

    The chosen side comes from the policy (the judge's best sample) or the dataset (the gold
    solution), the rejected side from the policy or another model (the judge's worst sample of that
    model's group), as the paper's Table 4 scenarios ask (``tagging.SCENARIO_SOURCES``):

    1. policy best vs policy worst of a group with a clear winner (tied groups are dropped);
    2. gold vs the policy's worst, provided that sample is not correct (all-wrong groups qualify);
    3. policy best vs the other model's worst, provided the judge scores them at least ``min_gap`` apart;
    4. gold vs the other model's worst, provided that sample is not correct.

    ``policy_tags`` gives each side's log-prob and hidden-state sum under the starting policy
    (:data:`PolicyTags`): every pair records both sides' log-prob under it, so how on-policy a pair is can
    be read off, and its CHES.
    """
    judged = _Judged.index(prompts, candidates, scores, selections)
    skipped: Counter[str] = Counter()
    rows = []
    for pid in sorted({pid for pid, _ in judged.selections}):
        pair = _judged_pair(pid, judged, tokenizer, settings)
        if isinstance(pair, str):
            skipped[pair] += 1
        else:
            rows.append(pair)
    return _tag_under_policy(rows, policy_tags), dict(skipped)


def _judged_pair(pid: str, judged: _Judged, tokenizer, settings: PairSettings) -> dict | str:
    """The pair of one prompt in ``settings.scenario``, or why it has none."""
    chosen_src, rejected_src = tagging.SCENARIO_SOURCES[settings.scenario]
    p = judged.prompts.get(pid)
    if p is None:
        raise ValueError(f"selections: prompt_id {pid!r} is not in the prompts table")
    rej_sel = judged.selections.get((pid, rejected_src))
    if rej_sel is None:
        return f"no_{rejected_src}_samples"
    if rej_sel["status"] == "failed":
        return f"judge_failed_{rejected_src}"
    rkey = (pid, rejected_src, rej_sel["worst_idx"])
    worst = judged.candidates[rkey]
    rejected = Side(
        list(worst["token_ids"]), worst["text"], rejected_src, judged.scores[rkey]["correct"], worst["logprob_sum"]
    )
    chosen = _policy_best(pid, rkey, judged, settings) if chosen_src == "policy" else _gold(p, rejected, tokenizer)
    if isinstance(chosen, str):
        return chosen
    if chosen.ids == rejected.ids:
        return "identical"
    return _row(
        f"{pid}-s{settings.scenario}",
        pid,
        settings.split_of(pid),
        encode_prompt(tokenizer, p["prompt"]),
        chosen,
        rejected,
        settings.scenario,
    )


def _policy_best(pid: str, rkey: tuple[str, str, int], judged: _Judged, settings: PairSettings) -> Side | str:
    """The judge's best of the policy's samples as the chosen, or why it cannot be: the judge failed, its
    group is a tie (scenario 1) or it scores less than ``min_gap`` above the rejected ``rkey`` (scenario 3)."""
    sel = judged.selections.get((pid, "policy"))
    if sel is None or sel["status"] == "failed":
        return "judge_failed_policy"
    if settings.scenario == 1 and sel["status"] != "ok":
        return "tie"
    ckey = (pid, "policy", sel["best_idx"])
    if settings.scenario == 3 and judged.scores[ckey]["score"] - judged.scores[rkey]["score"] < settings.min_gap:
        return "no_score_gap"
    best = judged.candidates[ckey]
    return Side(list(best["token_ids"]), best["text"], "policy", judged.scores[ckey]["correct"], best["logprob_sum"])


def _gold(prompt: dict, rejected: Side, tokenizer) -> Side | str:
    """The dataset's gold solution as the chosen, or why it cannot be: there is none, or the rejected is
    correct too."""
    if prompt["solution"] is None:
        return "no_gold_solution"
    if rejected.correct:
        return "worst_is_correct"
    return Side(encode_response(tokenizer, prompt["solution"]), prompt["solution"], "gold", True, None)


# --------------------------------------------------------------------------------------------- constructed pairs
def build_constructed_pairs(
    prompts: pl.DataFrame,
    candidates: pl.DataFrame,
    scores: pl.DataFrame,
    tokenizer,
    policy_tags: PolicyTags,
    settings: PairSettings,
) -> tuple[pl.DataFrame, dict]:
    """One constructed pair per usable prompt of the ``train`` split: the chosen a correct response, the
    rejected that response with a controlled edit (:mod:`pipeline.data.edits`), as the DPOP paper built its
    low-edit-distance sets (arXiv 2402.13228). Returns the pairs table and counts of skipped prompts.

    The chosen is taken from the first source of ``settings.chosen_from`` that has a correct response:
    ``policy``, the policy's correct candidate of highest sampler log-prob (the most on-policy one), or
    ``gold``, the dataset's solution. Within each split the usable prompts, in the order of a seeded hash, take
    the kinds of ``settings.edit_kinds`` in turn, so every kind has the same number of pairs (to one) in each
    split; the pairs then span edit distance. Tags: ``rejected_source`` ``edit:<kind>``, scenario 0 (none of
    the four of the 3D-properties paper: the rejected is neither sampled nor another model's).
    """
    best = _best_correct_policy(candidates, scores)
    skipped: Counter[str] = Counter()
    usable: dict[str, list[tuple[dict, Side]]] = {"train": [], "heldout": []}
    for p in prompts.filter(pl.col("split") == "train").iter_rows(named=True):
        chosen = _constructed_chosen(p, best, settings.chosen_from, tokenizer)
        if chosen is None:
            skipped["no_correct_" + "_or_".join(settings.chosen_from)] += 1
        else:
            usable[settings.split_of(p["prompt_id"])].append((p, chosen))
    rows = []
    for split, items in usable.items():
        items.sort(key=lambda it: hashlib.sha1(f"{settings.seed}:edit:{it[0]['prompt_id']}".encode()).hexdigest())
        for i, (p, chosen) in enumerate(items):
            kind = settings.edit_kinds[i % len(settings.edit_kinds)]
            row = _edited_pair(p, chosen, kind, split, tokenizer, settings.seed)
            if row is None:
                skipped["no_number_to_edit"] += 1
            else:
                rows.append(row)
    rows.sort(key=lambda r: r["pair_id"])
    return _tag_under_policy(rows, policy_tags), dict(skipped)


def _best_correct_policy(candidates: pl.DataFrame, scores: pl.DataFrame) -> dict[str, dict]:
    """Per prompt, the policy's correct candidate of highest sampler log-prob (of equals, the first)."""
    correct = {
        (r["prompt_id"], r["candidate_idx"])
        for r in scores.filter((pl.col("source") == "policy") & pl.col("correct"))
        .select("prompt_id", "candidate_idx")
        .iter_rows(named=True)
    }
    best: dict[str, dict] = {}
    for c in candidates.filter(pl.col("source") == "policy").iter_rows(named=True):
        if (c["prompt_id"], c["candidate_idx"]) in correct:
            b = best.get(c["prompt_id"])
            if b is None or (c["logprob_sum"], -c["candidate_idx"]) > (b["logprob_sum"], -b["candidate_idx"]):
                best[c["prompt_id"]] = c
    return best


def _constructed_chosen(prompt: dict, best: dict[str, dict], chosen_from: tuple[str, ...], tokenizer) -> Side | None:
    """The chosen from the first source of ``chosen_from`` with a correct response; None if none has one."""
    for src in chosen_from:
        if src == "policy" and prompt["prompt_id"] in best:
            c = best[prompt["prompt_id"]]
            return Side(list(c["token_ids"]), c["text"], "policy", True, c["logprob_sum"])
        if src == "gold" and prompt["solution"] is not None:
            return Side(encode_response(tokenizer, prompt["solution"]), prompt["solution"], "gold", True, None)
    return None


def _edited_pair(prompt: dict, chosen: Side, kind: str, split: str, tokenizer, seed: int) -> dict | None:
    """The pair of ``chosen`` and its edit of ``kind``; None where the edit leaves the tokens as they are."""
    rng = random.Random(f"{seed}:{prompt['prompt_id']}:{kind}")
    text = edits.edit(chosen.text, kind, prompt["answer"], rng)
    ids = encode_response(tokenizer, text) if text is not None else chosen.ids
    if text is None or ids == chosen.ids:
        return None
    rejected = Side(ids, text, f"{EDIT_SOURCE}:{kind}", False, None)
    prompt_ids = encode_prompt(tokenizer, prompt["prompt"])
    return _row(
        f"{prompt['prompt_id']}-e{kind}", prompt["prompt_id"], split, prompt_ids, chosen, rejected, SCENARIO_IMPORTED
    )


# --------------------------------------------------------------------------------------------- tags and scores
def token_tags(chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """The tags read off the two sides' token ids: edit distance, first difference, lengths."""
    return {
        "edit_distance": tagging.edit_distance(chosen_ids, rejected_ids),
        "edit_distance_norm": tagging.normalised_distance(chosen_ids, rejected_ids),
        "first_diff": tagging.first_difference(chosen_ids, rejected_ids),
        "len_w": len(chosen_ids),
        "len_l": len(rejected_ids),
    }


def _tag_under_policy(rows: list[dict], policy_tags: PolicyTags) -> pl.DataFrame:
    """The ``pairs`` table of ``rows``, each side tagged with its log-prob under the starting policy and each
    pair with its CHES and length-normalised CHES (:mod:`pipeline.data.ches`), from one pass per side."""
    from pipeline.data.ches import ches_scores
    from pipeline.schema import empty, schema_of

    if not rows:
        return empty("pairs")
    prompts_ids = [r["prompt_ids"] for r in rows]
    lw, h_w, n_w = policy_tags(prompts_ids, [r["chosen_ids"] for r in rows])
    ll, h_l, n_l = policy_tags(prompts_ids, [r["rejected_ids"] for r in rows])
    ches, norm = ches_scores(h_w, h_l, n_w, n_l)
    for r, lp_w, lp_l, c, cn in zip(rows, lw, ll, ches, norm):
        r.update(chosen_policy_logprob=float(lp_w), rejected_policy_logprob=float(lp_l), ches=c, ches_norm=cn)
    return pl.DataFrame(rows, schema=schema_of("pairs"))


def build_imported_pairs(rows: list[dict], heldout_fraction: float, seed: int, policy_tags: PolicyTags) -> pl.DataFrame:
    """The ``pairs`` table of pairs read from a file (``trl_format.read_pairs_file``'s rows).

    They get what our pairs get: the held-out split by prompt (:func:`is_heldout`), the token tags and
    both sides' log-prob under the starting policy. Tags the file carries (our export's) are kept; where
    it does not say, the sources are ``imported`` and the scenario 0, and correctness and the sampler's
    log-probs are null.
    """
    out = []
    for r in rows:
        chosen, rejected = (
            Side(
                r[f"{side}_ids"],
                r[f"{side}_text"],
                r[f"{side}_source"] or IMPORTED,
                r[f"{side}_correct"],
                r[f"{side}_sampler_logprob"],
            )
            for side in ("chosen", "rejected")
        )
        split = "heldout" if is_heldout(r["prompt_id"], heldout_fraction, seed) else "train"
        scenario = SCENARIO_IMPORTED if r["scenario"] is None else r["scenario"]
        out.append(_row(r["pair_id"], r["prompt_id"], split, r["prompt_ids"], chosen, rejected, scenario))
    return _tag_under_policy(out, policy_tags)


def judge_scores(pairs: pl.DataFrame, selections: pl.DataFrame) -> dict[str, tuple[float | None, float | None]]:
    """pair_id -> (chosen score, rejected score) by the judge: its best and worst of the side's group
    (the gold solution is not judged: None)."""
    sel = {(r["prompt_id"], r["source"]): r for r in selections.iter_rows(named=True)}
    out = {}
    for p in pairs.iter_rows(named=True):
        pid = p["prompt_id"]
        chosen = sel[(pid, "policy")]["best_score"] if p["chosen_source"] == "policy" else None
        out[p["pair_id"]] = (chosen, sel[(pid, p["rejected_source"])]["worst_score"])
    return out
