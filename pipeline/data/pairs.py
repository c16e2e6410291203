"""Chosen/rejected pairs from judged candidates, for one of the data scenarios of the 3D-properties
paper (Yan et al. 2024, arXiv 2406.07327), or read from a pairs file (:func:`build_imported_pairs`),
tagged alike."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable

import polars as pl

from pipeline.data import tagging
from pipeline.data.trl_format import IMPORTED, SCENARIO_IMPORTED
from pipeline.model.encoding import encode_prompt, encode_response

EDIT_SOURCE = "edit"  # rejected_source of constructed pairs: edit:<kind>
# (prompt ids, response ids) -> per response: summed log-prob, hidden-state sum [N, d] and token count [N]
# under the starting policy (pipeline.model.logprobs.response_logprobs_and_hidden, truncated as training is)
PolicyTags = Callable[[list[list[int]], list[list[int]]], tuple[list[float], "torch.Tensor", "torch.Tensor"]]


def is_heldout(prompt_id: str, fraction: float, seed: int) -> bool:
    """Stable split by prompt: the same prompt is held out whatever else is in the set."""
    h = int(hashlib.sha1(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def build_pairs(prompts: pl.DataFrame, candidates: pl.DataFrame, scores: pl.DataFrame,
                selections: pl.DataFrame, tokenizer, scenario: int, heldout_fraction: float,
                seed: int, policy_tags: PolicyTags,
                min_gap: float) -> tuple[pl.DataFrame, dict]:
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
    chosen_src, rejected_src = tagging.SCENARIO_SOURCES[scenario]
    cand = {(r["prompt_id"], r["source"], r["candidate_idx"]): r for r in candidates.iter_rows(named=True)}
    score = {(r["prompt_id"], r["source"], r["candidate_idx"]): r for r in scores.iter_rows(named=True)}
    sel = {(r["prompt_id"], r["source"]): r for r in selections.iter_rows(named=True)}
    prm = {r["prompt_id"]: r for r in prompts.iter_rows(named=True)}
    skipped: Counter[str] = Counter()
    rows = []
    for pid in sorted({k[0] for k in sel}):
        p = prm.get(pid)
        if p is None:
            raise ValueError(f"selections: prompt_id {pid!r} is not in the prompts table")
        rej_sel = sel.get((pid, rejected_src))
        if rej_sel is None:
            skipped[f"no_{rejected_src}_samples"] += 1
            continue
        if rej_sel["status"] == "failed":
            skipped[f"judge_failed_{rejected_src}"] += 1
            continue
        rkey = (pid, rejected_src, rej_sel["worst_idx"])
        worst, worst_correct = cand[rkey], score[rkey]["correct"]
        if chosen_src == "policy":
            ch_sel = sel.get((pid, "policy"))
            if ch_sel is None or ch_sel["status"] == "failed":
                skipped["judge_failed_policy"] += 1
                continue
            if scenario == 1 and ch_sel["status"] != "ok":
                skipped["tie"] += 1
                continue
            ckey = (pid, "policy", ch_sel["best_idx"])
            if scenario == 3 and score[ckey]["score"] - score[rkey]["score"] < min_gap:
                skipped["no_score_gap"] += 1
                continue
            chosen = cand[ckey]
            c_ids, c_text, c_lp = list(chosen["token_ids"]), chosen["text"], chosen["logprob_sum"]
            c_correct = score[ckey]["correct"]
        else:
            if p["solution"] is None:
                skipped["no_gold_solution"] += 1
                continue
            if worst_correct:
                skipped["worst_is_correct"] += 1
                continue
            c_text = p["solution"]
            c_ids, c_lp, c_correct = encode_response(tokenizer, c_text), None, True
        r_ids = list(worst["token_ids"])
        if c_ids == r_ids:
            skipped["identical"] += 1
            continue
        rows.append({
            "pair_id": f"{pid}-s{scenario}",
            "prompt_id": pid,
            "split": "heldout" if is_heldout(pid, heldout_fraction, seed) else "train",
            "prompt_ids": encode_prompt(tokenizer, p["prompt"]),
            "chosen_ids": c_ids,
            "rejected_ids": r_ids,
            "chosen_text": c_text,
            "rejected_text": worst["text"],
            "chosen_source": chosen_src,
            "rejected_source": rejected_src,
            "chosen_correct": c_correct,
            "rejected_correct": worst_correct,
            "chosen_sampler_logprob": c_lp,
            "rejected_sampler_logprob": worst["logprob_sum"],
            "scenario": scenario,
            **token_tags(c_ids, r_ids),
        })
    return _tag_under_policy(rows, policy_tags), dict(skipped)


def build_constructed_pairs(prompts: pl.DataFrame, candidates: pl.DataFrame, scores: pl.DataFrame,
                            tokenizer, chosen_from: list[str], edits: list[str], heldout_fraction: float, seed: int,
                            policy_tags: PolicyTags
                            ) -> tuple[pl.DataFrame, dict]:
    """One constructed pair per usable prompt of the ``train`` split: the chosen a correct response, the
    rejected that response with a controlled edit (:mod:`pipeline.data.edits`), as the DPOP paper built its
    low-edit-distance sets (arXiv 2402.13228). Returns the pairs table and counts of skipped prompts.

    The chosen is taken from the first source of ``chosen_from`` that has a correct response: ``policy``,
    the policy's correct candidate of highest sampler log-prob (the most on-policy one), or ``gold``, the
    dataset's solution. Within each split the usable prompts, in the order of a seeded hash, take the kinds
    of ``edits`` in turn, so every kind has the same number of pairs (to one) in each split; the pairs then
    span edit distance. Tags: ``rejected_source`` ``edit:<kind>``, scenario 0 (none of the four of the
    3D-properties paper: the rejected is neither sampled nor another model's).
    """
    from pipeline.data import edits as E

    correct = {(r["prompt_id"], r["candidate_idx"]) for r in scores.filter(
        (pl.col("source") == "policy") & pl.col("correct")).select("prompt_id", "candidate_idx").iter_rows(named=True)}
    best: dict[str, dict] = {}
    for c in candidates.filter(pl.col("source") == "policy").iter_rows(named=True):
        if (c["prompt_id"], c["candidate_idx"]) in correct:
            b = best.get(c["prompt_id"])
            if b is None or (c["logprob_sum"], -c["candidate_idx"]) > (b["logprob_sum"], -b["candidate_idx"]):
                best[c["prompt_id"]] = c
    skipped: Counter[str] = Counter()
    usable: dict[str, list[tuple[dict, str, list[int], str, float | None]]] = {"train": [], "heldout": []}
    for p in prompts.filter(pl.col("split") == "train").iter_rows(named=True):
        for src in chosen_from:
            if src == "policy" and p["prompt_id"] in best:
                c = best[p["prompt_id"]]
                choice = (p, "policy", list(c["token_ids"]), c["text"], c["logprob_sum"])
                break
            if src == "gold" and p["solution"] is not None:
                choice = (p, "gold", encode_response(tokenizer, p["solution"]), p["solution"], None)
                break
        else:
            skipped["no_correct_" + "_or_".join(chosen_from)] += 1
            continue
        usable["heldout" if is_heldout(p["prompt_id"], heldout_fraction, seed) else "train"].append(choice)
    rows = []
    for split, items in usable.items():
        items.sort(key=lambda it: hashlib.sha1(f"{seed}:edit:{it[0]['prompt_id']}".encode()).hexdigest())
        for i, (p, src, c_ids, c_text, c_lp) in enumerate(items):
            kind = edits[i % len(edits)]
            rng = random.Random(f"{seed}:{p['prompt_id']}:{kind}")
            r_text = E.edit(c_text, kind, p["answer"], rng)
            r_ids = encode_response(tokenizer, r_text) if r_text is not None else c_ids
            if r_text is None or r_ids == c_ids:
                skipped["no_number_to_edit"] += 1
                continue
            rows.append({
                "pair_id": f"{p['prompt_id']}-e{kind}",
                "prompt_id": p["prompt_id"],
                "split": split,
                "prompt_ids": encode_prompt(tokenizer, p["prompt"]),
                "chosen_ids": c_ids,
                "rejected_ids": r_ids,
                "chosen_text": c_text,
                "rejected_text": r_text,
                "chosen_source": src,
                "rejected_source": f"{EDIT_SOURCE}:{kind}",
                "chosen_correct": True,
                "rejected_correct": False,
                "chosen_sampler_logprob": c_lp,
                "rejected_sampler_logprob": None,
                "scenario": SCENARIO_IMPORTED,
                **token_tags(c_ids, r_ids),
            })
    rows.sort(key=lambda r: r["pair_id"])
    return _tag_under_policy(rows, policy_tags), dict(skipped)


def token_tags(chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """The tags read off the two sides' token ids: edit distance, first difference, lengths."""
    return {"edit_distance": tagging.edit_distance(chosen_ids, rejected_ids),
            "edit_distance_norm": tagging.normalised_distance(chosen_ids, rejected_ids),
            "first_diff": tagging.first_difference(chosen_ids, rejected_ids),
            "len_w": len(chosen_ids), "len_l": len(rejected_ids)}


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
    for r, w, l, c, cn in zip(rows, lw, ll, ches, norm):
        r.update(chosen_policy_logprob=float(w), rejected_policy_logprob=float(l), ches=c, ches_norm=cn)
    return pl.DataFrame(rows, schema=schema_of("pairs"))


def build_imported_pairs(rows: list[dict], heldout_fraction: float, seed: int,
                         policy_tags: PolicyTags) -> pl.DataFrame:
    """The ``pairs`` table of pairs read from a file (``trl_format.read_pairs_file``'s rows).

    They get what our pairs get: the held-out split by prompt (:func:`is_heldout`), the token tags and
    both sides' log-prob under the starting policy. Tags the file carries (our export's) are kept; where
    it does not say, the sources are ``imported`` and the scenario 0, and correctness and the sampler's
    log-probs are null.
    """
    out = []
    for r in rows:
        out.append({
            "pair_id": r["pair_id"],
            "prompt_id": r["prompt_id"],
            "split": "heldout" if is_heldout(r["prompt_id"], heldout_fraction, seed) else "train",
            "prompt_ids": r["prompt_ids"],
            "chosen_ids": r["chosen_ids"],
            "rejected_ids": r["rejected_ids"],
            "chosen_text": r["chosen_text"],
            "rejected_text": r["rejected_text"],
            "chosen_source": r["chosen_source"] or IMPORTED,
            "rejected_source": r["rejected_source"] or IMPORTED,
            "chosen_correct": r["chosen_correct"],
            "rejected_correct": r["rejected_correct"],
            "chosen_sampler_logprob": r["chosen_sampler_logprob"],
            "rejected_sampler_logprob": r["rejected_sampler_logprob"],
            "scenario": SCENARIO_IMPORTED if r["scenario"] is None else r["scenario"],
            **token_tags(r["chosen_ids"], r["rejected_ids"]),
        })
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


def on_policy_summary(pairs: pl.DataFrame) -> dict:
    """How on-policy the pairs are: mean per-token log-prob of each side under the starting policy,
    and, for sides the policy sampled itself, how far the sampler's log-prob is from the policy's."""
    if len(pairs) == 0:
        return {}
    out = {}
    for side, n in (("chosen", "len_w"), ("rejected", "len_l")):
        out[f"{side}_policy_logprob_per_token"] = (pairs[f"{side}_policy_logprob"] / pairs[n]).mean()
        own = pairs.filter(pl.col(f"{side}_source") == "policy")
        if len(own):
            d = (own[f"{side}_sampler_logprob"] - own[f"{side}_policy_logprob"]).abs()
            out[f"{side}_sampler_vs_policy_abs_diff"] = {"mean": d.mean(), "max": d.max(), "n": len(own)}
    return out


def filter_by_ches(pairs: pl.DataFrame, by: str, percent: float) -> tuple[pl.DataFrame, dict]:
    """Drop the ``percent`` % training pairs of highest ``by`` (ches or ches_norm); held-out pairs stay, so that
    runs with and without the filter are evaluated on the same pairs. Returns the pairs and what was dropped."""
    from pipeline.data.ches import top_share

    train = pairs.filter(pl.col("split") == "train")
    drop = top_share(train[by].to_list(), percent) if percent else set()
    dropped = [train["pair_id"][i] for i in sorted(drop)]
    info = {"by": by, "top_percent": percent, "dropped": len(dropped),
            "threshold": min((train[by][i] for i in drop), default=None)}
    return pairs.filter(~pl.col("pair_id").is_in(dropped)), info
