"""CHES (Razin et al. 2025) against a hand computation on a tiny model, and the pairs.filter that uses it."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from pipeline.data.ches import ches_scores, top_share
from pipeline.data.pairs import filter_by_ches, with_ches
from pipeline.model import loading
from pipeline.model.logprobs import encode_prompt, encode_response, response_hidden_sums


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
    h_w, n_w = response_hidden_sums(model, prompts, chosen, tok.pad_token_id, 2)
    h_l, n_l = response_hidden_sums(model, prompts, rejected, tok.pad_token_id, 2)
    assert n_w.tolist() == [len(c) for c in chosen] and n_l.tolist() == [len(r) for r in rejected]
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


def test_with_ches_adds_both_columns(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32").eval()
    tok = loading.load_tokenizer(tiny_model_dir)
    pairs = pl.DataFrame({"pair_id": ["a"], "prompt_ids": [encode_prompt(tok, "Hi?")],
                          "chosen_ids": [encode_response(tok, "Hello.")], "rejected_ids": [encode_response(tok, "Go.")]})
    out = with_ches(pairs, model, tok.pad_token_id, 4, 64)
    assert out.columns[-2:] == ["ches", "ches_norm"] and out["ches"].is_finite().all()


def test_top_share_and_the_filter_drop_only_training_pairs():
    assert top_share([0.1, 5.0, 3.0, 5.0, -1.0], 40) == {1, 3}
    assert top_share([1.0, 2.0], 49) == set()
    pairs = pl.DataFrame({"pair_id": list("abcdef"), "split": ["train"] * 4 + ["heldout"] * 2,
                          "ches": [1.0, 4.0, 2.0, 3.0, 9.0, 8.0], "ches_norm": [0.0] * 6})
    kept, info = filter_by_ches(pairs, "ches", 50)
    assert kept["pair_id"].to_list() == ["a", "c", "e", "f"]  # b, d: the two highest of the four training pairs
    assert info == {"by": "ches", "top_percent": 50, "dropped": 2, "threshold": 3.0}
    same, info = filter_by_ches(pairs, "ches", 0)
    assert same.equals(pairs) and info["dropped"] == 0
