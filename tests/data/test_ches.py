"""CHES (Razin et al. 2025) against a hand computation on a tiny model, and the pairs.filter that uses it."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from pipeline.data.ches import ches_scores, filter_by_ches, top_share
from pipeline.model import loading
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import batched_logprobs, response_logprobs_and_hidden


def _by_hand(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Sum of the last hidden states (the LM head's input) at the positions before each response token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    return sum(hidden[len(prompt) - 1 + k] for k in range(len(response)))


def test_ches_equals_the_hand_computation(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32").eval()
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts = [encode_prompt(tok, "What is 2 + 3?"), encode_prompt(tok, "Name a colour, please.")]
    chosen = [encode_response(tok, "Answer: 5"), encode_response(tok, "Blue, like the sky.")]
    rejected = [encode_response(tok, "Answer: 6, I think"), encode_response(tok, "Blue.")]
    # batch 2: the rows pad to different lengths, as in the stage
    lp_w, h_w, n_w = response_logprobs_and_hidden(model, prompts, chosen, tok.pad_token_id, 2)
    lp_l, h_l, n_l = response_logprobs_and_hidden(model, prompts, rejected, tok.pad_token_id, 2)
    assert n_w.tolist() == [len(c) for c in chosen] and n_l.tolist() == [len(r) for r in rejected]
    # the same forward gives the log-probs the rest of the pipeline computes (one pass instead of two)
    for resp, lp in ((chosen, lp_w), (rejected, lp_l)):
        want = batched_logprobs(model, prompts, resp, tok.pad_token_id, 1)[0]  # one row per batch: no padding
        assert lp == pytest.approx(want, abs=1e-4)
    ches, norm = ches_scores(h_w, h_l, n_w, n_l)
    for i in range(2):
        hw, hl = _by_hand(model, prompts[i], chosen[i]), _by_hand(model, prompts[i], rejected[i])
        assert torch.allclose(h_w[i], hw, atol=1e-4)
        assert ches[i] == pytest.approx(float(hw @ hl - hw @ hw), rel=1e-4)
        mw, ml = hw / len(chosen[i]), hl / len(rejected[i])
        assert norm[i] == pytest.approx(float(mw @ ml - mw @ mw), rel=1e-4)
    # identical responses: <h, h> - ||h||^2 = 0
    same, _ = ches_scores(h_w, h_w, n_w, n_w)
    assert same == pytest.approx([0.0, 0.0], abs=1e-3)


def test_pairs_get_each_sides_policy_logprob_and_ches_from_one_pass_per_side(tiny_model_dir):
    """The pairs builders tag through one callback per side (the stage's: log-probs and hidden sums from
    one forward); the table's CHES columns are ches_scores of those sums."""
    from pipeline.data.pairs import build_imported_pairs

    model = loading.load_model(tiny_model_dir, "float32").eval()
    tok = loading.load_tokenizer(tiny_model_dir)
    calls = []

    def tags(prompt_ids, response_ids):
        calls.append(len(response_ids))
        return response_logprobs_and_hidden(model, prompt_ids, response_ids, tok.pad_token_id, 4, 64)

    rows = [
        {
            "pair_id": f"x{i}",
            "prompt_id": f"q{i}",
            "prompt_ids": encode_prompt(tok, q),
            "chosen_ids": encode_response(tok, w),
            "rejected_ids": encode_response(tok, l_),
            "chosen_text": w,
            "rejected_text": l_,
            "chosen_source": None,
            "rejected_source": None,
            "chosen_correct": None,
            "rejected_correct": None,
            "chosen_sampler_logprob": None,
            "rejected_sampler_logprob": None,
            "scenario": None,
        }
        for i, (q, w, l_) in enumerate((("Hi?", "Hello.", "Go."), ("2 + 2?", "Answer: 4", "Answer: 5 or so")))
    ]
    out = build_imported_pairs(rows, 0.0, 0, tags)
    assert calls == [2, 2]
    _, h_w, n_w = tags([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows])
    _, h_l, n_l = tags([r["prompt_ids"] for r in rows], [r["rejected_ids"] for r in rows])
    ches, norm = ches_scores(h_w, h_l, n_w, n_l)
    assert out["ches"].to_list() == pytest.approx(ches) and out["ches_norm"].to_list() == pytest.approx(norm)
    want = batched_logprobs(model, out["prompt_ids"].to_list(), out["chosen_ids"].to_list(), tok.pad_token_id, 1)[0]
    assert out["chosen_policy_logprob"].to_list() == pytest.approx(want, abs=1e-4)


def test_top_share_and_the_filter_drop_only_training_pairs():
    assert top_share([0.1, 5.0, 3.0, 5.0, -1.0], 40) == {1, 3}
    assert top_share([1.0, 2.0], 49) == set()
    pairs = pl.DataFrame(
        {
            "pair_id": list("abcdef"),
            "split": ["train"] * 4 + ["heldout"] * 2,
            "ches": [1.0, 4.0, 2.0, 3.0, 9.0, 8.0],
            "ches_norm": [0.0] * 6,
        }
    )
    kept, info = filter_by_ches(pairs, "ches", 50)
    assert kept["pair_id"].to_list() == ["a", "c", "e", "f"]  # b, d: the two highest of the four training pairs
    assert info == {"by": "ches", "top_percent": 50, "dropped": 2, "threshold": 3.0}
    same, info = filter_by_ches(pairs, "ches", 0)
    assert same.equals(pairs) and info["dropped"] == 0
