"""A stage workspace: a tiny policy folder, prompts and preference pairs in a temporary repository root."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from repo_utils import write_params

from pipeline.io import write_table
from pipeline.model import loading
from pipeline.model import precision
from pipeline.model.encoding import encode_prompt, encode_response

N_PAIRS = 8  # one pair per prompt; odd ones held out (their prompts are test prompts)


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_dir):
    """A policy folder, prompts and pairs (train and held-out); train.bf16 (the default) autocasts on CPU
    as it does on a GPU. The current directory is the workspace, as DVC runs a stage."""
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    shutil.copytree(tiny_model_dir, tmp_path / "models/policy")
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts, pairs = [], []
    for i in range(N_PAIRS):
        q = f"What is {i} + {3 * i}?" + " Be brief." * (i % 3)
        split = "heldout" if i % 2 else "train"
        prompts.append({"prompt_id": f"p{i}", "split": "test" if i % 2 else "train", "question": q, "prompt": q,
                        "answer": str(4 * i), "solution": None, "source": "test"})
        w = encode_response(tok, "So" + " then" * (2 * i % 5) + f" {4 * i}")
        l_ = encode_response(tok, f"It is {4 * i + 1}" + ", surely" * (i % 4))
        pairs.append({"pair_id": f"p{i}-s1", "prompt_id": f"p{i}", "split": split, "prompt_ids": encode_prompt(tok, q),
                      "chosen_ids": w, "rejected_ids": l_, "chosen_text": "", "rejected_text": "",
                      "chosen_source": "policy", "rejected_source": "policy", "chosen_correct": True,
                      "rejected_correct": False, "chosen_sampler_logprob": None, "rejected_sampler_logprob": None,
                      "chosen_policy_logprob": -1.0, "rejected_policy_logprob": -2.0, "scenario": 1,
                      "edit_distance": 3, "edit_distance_norm": 0.3, "first_diff": 0, "len_w": len(w), "len_l": len(l_),
                      "ches": -1.0, "ches_norm": -0.1})
    write_table(pl.DataFrame(prompts), tmp_path / "data/prompts.parquet", "prompts")
    write_table(pl.DataFrame(pairs), tmp_path / "data/pairs.parquet", "pairs")
    write_params(tmp_path / "params.yaml", {
        "policy": {"model": str(tmp_path / "models/policy")},
        "evaluate": {"generation": {"max_new_tokens": 4, "batch_size": 4}}})
    monkeypatch.chdir(tmp_path)
    return tmp_path
