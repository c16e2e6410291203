"""Pairs of the four data scenarios of the 3D-properties paper (Yan et al. 2024, arXiv 2406.07327), from
judged candidates of the policy and of another model."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.data.pair_summary import on_policy_summary
from pipeline.data.pairs import PairSettings, build_constructed_pairs, build_pairs
from pipeline.model.encoding import encode_response
from pipeline.schema import conform

MIN_GAP = 1e-9  # judge.min_gap of params.yaml: groups whose scores differ at all have a winner


def settings(
    scenario: int = 2,
    min_gap: float = MIN_GAP,
    chosen_from=("policy", "gold"),
    edit_kinds=("final",),
    heldout_fraction: float = 0.0,
) -> PairSettings:
    return PairSettings(
        scenario=scenario,
        heldout_fraction=heldout_fraction,
        seed=0,
        min_gap=min_gap,
        chosen_from=tuple(chosen_from),
        edit_kinds=tuple(edit_kinds),
    )


# Two prompts. p1: the policy has a right and a wrong sample, the other model two wrong ones.
# p2: the policy's samples are both wrong (a tie), the other model has a right one and a wrong one.
POLICY = {
    ("p1", 0): ("Answer: 3", True, 5.5),
    ("p1", 1): ("Answer: 4", False, 1.5),
    ("p2", 0): ("Answer: 9", False, 1.5),
    ("p2", 1): ("Answer: 8", False, 1.5),
}
OTHER = {
    ("p1", 0): ("it is 5", False, 0.5),
    ("p1", 1): ("Answer: 6", False, 1.5),
    ("p2", 0): ("Answer: 7", True, 5.5),
    ("p2", 1): ("seven?", False, 0.0),
}


def tables(tokenizer):
    prompts = pl.DataFrame(
        [
            {
                "prompt_id": p,
                "split": "train",
                "question": q,
                "prompt": q,
                "answer": a,
                "solution": f"{q} = {a}\nAnswer: {a}",
                "source": "test",
            }
            for p, q, a in (("p1", "1 + 2", "3"), ("p2", "3 + 4", "7"))
        ]
    )
    cands, scores, sels = [], [], []
    for src, table in (("policy", POLICY), ("other", OTHER)):
        for (pid, idx), (text, ok, score) in table.items():
            ids = encode_response(tokenizer, text)
            cands.append(
                {
                    "prompt_id": pid,
                    "candidate_idx": idx,
                    "text": text,
                    "token_ids": ids,
                    "num_tokens": len(ids),
                    "logprob_sum": -1.0 - idx - (src == "other") * 10,
                    "finish_reason": "stop",
                    "source": src,
                    "model": src,
                }
            )
            scores.append(
                {
                    "prompt_id": pid,
                    "source": src,
                    "candidate_idx": idx,
                    "score": score,
                    "correct": ok,
                    "extracted_answer": None,
                    "judge": "rule",
                }
            )
        for pid in ("p1", "p2"):
            s = {i: table[(pid, i)][2] for i in (0, 1)}
            best, worst = max(s, key=lambda i: (s[i], -i)), min(s, key=lambda i: (s[i], i))
            status = "ok" if s[best] > s[worst] else "tie"
            sels.append(
                {
                    "prompt_id": pid,
                    "source": src,
                    "status": status,
                    "best_idx": best,
                    "worst_idx": worst,
                    "best_score": s[best],
                    "worst_score": s[worst],
                    "best_correct": table[(pid, best)][1],
                    "worst_correct": table[(pid, worst)][1],
                }
            )
    return (
        conform(prompts, "prompts"),
        conform(pl.DataFrame(cands), "candidates"),
        conform(pl.DataFrame(scores), "scores"),
        conform(pl.DataFrame(sels), "selections"),
    )


def fake_policy_logprobs(calls):
    """A stand-in for the stage's policy pass: -0.5 nats per token, hidden sums of ones."""
    import torch

    def fn(prompt_ids, response_ids):
        calls.append(len(response_ids))
        n = torch.tensor([len(r) for r in response_ids])
        return [-0.5 * len(r) for r in response_ids], torch.ones(len(response_ids), 3) * n[:, None], n

    return fn


@pytest.mark.parametrize(
    "scenario,expected",
    [
        # 1: only p1 has a clear winner among the policy's samples
        (1, {"p1": ("policy", "Answer: 3", "policy", "Answer: 4")}),
        # 2: gold vs the policy's worst, when that is wrong (p2's tie qualifies)
        (
            2,
            {
                "p1": ("gold", "1 + 2 = 3\nAnswer: 3", "policy", "Answer: 4"),
                "p2": ("gold", "3 + 4 = 7\nAnswer: 7", "policy", "Answer: 9"),
            },
        ),
        # 3: policy best vs other worst with a score gap; p2's policy best (1.5) beats other worst (0.0)
        (3, {"p1": ("policy", "Answer: 3", "other", "it is 5"), "p2": ("policy", "Answer: 9", "other", "seven?")}),
        # 4: gold vs the other model's worst
        (
            4,
            {
                "p1": ("gold", "1 + 2 = 3\nAnswer: 3", "other", "it is 5"),
                "p2": ("gold", "3 + 4 = 7\nAnswer: 7", "other", "seven?"),
            },
        ),
    ],
)
def test_each_scenario_takes_its_sources(tokenizer, scenario, expected):
    prompts, cands, scores, sels = tables(tokenizer)
    calls = []
    pairs, skipped = build_pairs(
        prompts, cands, scores, sels, tokenizer, fake_policy_logprobs(calls), settings(scenario)
    )
    conform(pairs, "pairs")
    # CHES of the stand-in's hidden sums h = n·1: <h_w, h_l> − ||h_w||² = 3 n_w (n_l − n_w); normalised: 0
    assert (pairs["ches"] == 3 * pairs["len_w"] * (pairs["len_l"] - pairs["len_w"])).all()
    assert pairs["ches_norm"].abs().max() < 1e-9
    got = {
        r["prompt_id"]: (r["chosen_source"], r["chosen_text"], r["rejected_source"], r["rejected_text"])
        for r in pairs.iter_rows(named=True)
    }
    assert got == expected
    assert set(pairs["scenario"]) == {scenario}
    # every side is tagged with its log-prob under the policy (here the fake: -0.5 per token)
    assert (pairs["chosen_policy_logprob"] == -0.5 * pairs["len_w"]).all()
    assert (pairs["rejected_policy_logprob"] == -0.5 * pairs["len_l"]).all()
    assert calls == [len(pairs), len(pairs)]
    # the sampler's log-prob is the one of the model that sampled the side (other: the -10 offset)
    for r in pairs.iter_rows(named=True):
        assert (r["chosen_sampler_logprob"] is None) == (r["chosen_source"] == "gold")
        assert (r["rejected_sampler_logprob"] < -10) == (r["rejected_source"] == "other")
    if scenario == 1:
        assert skipped == {"tie": 1}


def test_scenario_3_needs_a_score_gap_and_other_samples(tokenizer):
    prompts, cands, scores, sels = tables(tokenizer)
    pairs, skipped = build_pairs(
        prompts, cands, scores, sels, tokenizer, fake_policy_logprobs([]), settings(3, min_gap=2.0)
    )
    assert pairs["prompt_id"].to_list() == ["p1"] and skipped == {"no_score_gap": 1}  # p2: 1.5 - 0.0 < 2
    no_other = sels.filter(pl.col("source") == "policy")
    pairs, skipped = build_pairs(prompts, cands, scores, no_other, tokenizer, fake_policy_logprobs([]), settings(4))
    assert len(pairs) == 0 and skipped == {"no_other_samples": 2}


def test_on_policy_summary_reads_how_on_policy_a_pair_is(tokenizer):
    prompts, cands, scores, sels = tables(tokenizer)
    pairs, _ = build_pairs(prompts, cands, scores, sels, tokenizer, fake_policy_logprobs([]), settings(3))
    s = on_policy_summary(pairs)
    assert s["chosen_policy_logprob_per_token"] == pytest.approx(-0.5)
    # policy-sampled chosen side: |sampler - policy| is reported; the other model's side is not
    assert s["chosen_sampler_vs_policy_abs_diff"]["n"] == 2 and "rejected_sampler_vs_policy_abs_diff" not in s


def test_constructed_pairs_take_a_correct_chosen_and_balanced_edit_kinds(tokenizer):
    """source constructed: the chosen is the policy's correct candidate (p1), else the gold solution (p2, whose
    samples are all wrong); the rejected is an edit of it, wrong; within a split the kinds take turns."""
    prompts, cands, scores, _ = tables(tokenizer)
    calls = []
    pairs, skipped = build_constructed_pairs(
        prompts,
        cands,
        scores,
        tokenizer,
        fake_policy_logprobs(calls),
        settings(chosen_from=("policy", "gold"), edit_kinds=("final", "all")),
    )
    got = {r["prompt_id"]: r for r in pairs.iter_rows(named=True)}
    assert (got["p1"]["chosen_source"], got["p1"]["chosen_text"]) == ("policy", "Answer: 3")
    assert (got["p2"]["chosen_source"], got["p2"]["chosen_text"]) == ("gold", "3 + 4 = 7\nAnswer: 7")
    assert sorted(r["rejected_source"] for r in got.values()) == ["edit:all", "edit:final"]
    for r in got.values():
        assert r["pair_id"] == f"{r['prompt_id']}-e{r['rejected_source'][5:]}"
        assert r["rejected_text"] != r["chosen_text"] and r["rejected_correct"] is False and r["chosen_correct"]
        assert r["scenario"] == 0 and r["rejected_sampler_logprob"] is None
        assert r["rejected_ids"] == encode_response(tokenizer, r["rejected_text"])
    assert got["p1"]["chosen_sampler_logprob"] == -1.0 and got["p2"]["chosen_sampler_logprob"] is None
    assert calls == [2, 2] and skipped == {}
    conform(pairs, "pairs")

    # policy only: p2 has no correct sample and is counted, not silently dropped
    pairs, skipped = build_constructed_pairs(
        prompts,
        cands,
        scores,
        tokenizer,
        fake_policy_logprobs([]),
        settings(chosen_from=("policy",), edit_kinds=("step",)),
    )
    assert pairs["prompt_id"].to_list() == ["p1"] and skipped == {"no_correct_policy": 1}

    # many prompts, half held out: each split's kinds differ in count by at most one, every pair is wrong
    many = pl.concat([prompts.with_columns(prompt_id=pl.lit(f"q{i}")) for i in range(30)])
    pairs, _ = build_constructed_pairs(
        many.filter(pl.col("prompt_id") != "p1"),
        cands,
        scores,
        tokenizer,
        fake_policy_logprobs([]),
        settings(chosen_from=("gold",), edit_kinds=("final", "step", "all"), heldout_fraction=0.5),
    )
    for split in ("train", "heldout"):
        counts = pairs.filter(pl.col("split") == split)["rejected_source"].value_counts()["count"].to_list()
        assert len(counts) == 3 and max(counts) - min(counts) <= 1, (split, counts)
    assert not pairs["rejected_correct"].any()
