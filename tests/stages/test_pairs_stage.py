"""Stage `pairs`: the pairs also come out in TRL's preference format (which `datasets.load_dataset` and TRL's
DPOTrainer read), and a pairs file comes in through `pairs.source`: our own export round-trips, bad rows
are refused or quarantined and counted."""

from __future__ import annotations

import json
import math
import shutil

import polars as pl
import pytest
import yaml
from repo_utils import repo_params, write_params

from pipeline.data.trl_format import PairsFileError
from pipeline.io import read_json, read_table, write_table
from pipeline.model import loading
from pipeline.model.encoding import encode_response
from pipeline.schema import TABLES, empty
from pipeline.settings.base import ConfigError
from pipeline.settings.params import Params

N_PROMPTS = 8


@pytest.fixture
def judged(tmp_path, monkeypatch, tiny_model_dir):
    """Judged candidates of N_PROMPTS prompts (scenario 1: the policy's right answer against its wrong one)."""
    shutil.copytree(tiny_model_dir, tmp_path / "models/policy")
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts, cands, scores, sels = [], [], [], []
    for i in range(N_PROMPTS):
        q = f"What is {i} + {i + 5}?"
        prompts.append(
            {
                "prompt_id": f"p{i}",
                "split": "train",
                "question": q,
                "prompt": q + " Be brief.",
                "answer": str(2 * i + 5),
                "solution": None,
                "source": "test",
            }
        )
        right, wrong = f"Answer: {2 * i + 5}", f"Answer: {2 * i + 6}"
        # the sampler's ids need not be the text's own tokenization: the right answer's final digit apart
        right_ids = encode_response(tok, right[:-1])[:-1] + encode_response(tok, right[-1])
        for idx, (text, ids, ok, score) in enumerate(((right, right_ids, True, 5.5), (wrong, None, False, 1.5))):
            ids = ids or encode_response(tok, text)
            cands.append(
                {
                    "prompt_id": f"p{i}",
                    "candidate_idx": idx,
                    "text": text,
                    "token_ids": ids,
                    "num_tokens": len(ids),
                    "logprob_sum": -1.25 - idx,
                    "finish_reason": "stop",
                    "source": "policy",
                    "model": "tiny",
                }
            )
            scores.append(
                {
                    "prompt_id": f"p{i}",
                    "source": "policy",
                    "candidate_idx": idx,
                    "score": score,
                    "correct": ok,
                    "extracted_answer": text[8:],
                    "judge": "rule",
                }
            )
        sels.append(
            {
                "prompt_id": f"p{i}",
                "source": "policy",
                "status": "ok",
                "best_idx": 0,
                "worst_idx": 1,
                "best_score": 5.5,
                "worst_score": 1.5,
                "best_correct": True,
                "worst_correct": False,
            }
        )
    write_table(pl.DataFrame(prompts), tmp_path / "data/prompts.parquet", "prompts")
    write_table(pl.DataFrame(cands), tmp_path / "data/candidates.parquet", "candidates")
    write_table(empty("candidates"), tmp_path / "data/candidates_other.parquet", "candidates")
    write_table(pl.DataFrame(scores), tmp_path / "data/judge/scores.parquet", "scores")
    write_table(pl.DataFrame(sels), tmp_path / "data/judge/selections.parquet", "selections")
    write_params(
        tmp_path / "params.yaml",
        {
            "policy": {"model": str(tmp_path / "models/policy")},
            "pairs": {"source": "judged", "scenario": 1, "heldout_fraction": 0.5},
        },
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_pairs(root, **pairs_params):
    from stages import pairs

    if pairs_params:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["pairs"].update(pairs_params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pairs.main(["--params", "params.yaml"])
    return read_table(root / "data/pairs.parquet", "pairs").sort("pair_id")


def import_params(source: str, on_bad_rows="error") -> dict:
    return {"source": source, "inputs": [source] * 3, "on_bad_rows": on_bad_rows}


def test_export_is_what_datasets_load_dataset_reads(judged):
    import datasets

    pairs = run_pairs(judged)
    assert set(pairs["split"]) == {"train", "heldout"} and len(pairs) == N_PROMPTS
    want = {"train": pairs.filter(pl.col("split") == "train"), "test": pairs.filter(pl.col("split") == "heldout")}
    cache = str(judged / "hf-cache")
    for loaded in (
        datasets.load_dataset(str(judged / "data/pairs_trl/parquet"), cache_dir=cache),
        datasets.load_dataset(str(judged / "data/pairs_trl/jsonl"), cache_dir=cache),
        datasets.load_dataset(
            "json",
            cache_dir=cache,
            data_files={s: str(judged / f"data/pairs_trl/jsonl/{s}.jsonl") for s in ("train", "test")},
        ),
    ):
        assert set(loaded) == {"train", "test"}
        for split, ds in loaded.items():
            assert ds.column_names == list(TABLES["pairs_trl"])
            rows = sorted(ds, key=lambda r: r["pair_id"])
            ours = want[split]
            assert [r["pair_id"] for r in rows] == ours["pair_id"].to_list()
            for r, p in zip(rows, ours.iter_rows(named=True)):
                i = int(p["prompt_id"][1:])
                assert r["prompt"] == [{"role": "user", "content": f"What is {i} + {i + 5}? Be brief."}]
                assert r["chosen"] == [{"role": "assistant", "content": p["chosen_text"]}]
                assert r["rejected"] == [{"role": "assistant", "content": p["rejected_text"]}]
                assert (r["score_chosen"], r["score_rejected"]) == (5.5, 1.5)  # the judge's best and worst
                assert r["chosen_token_ids"] == p["chosen_ids"]  # the sampled ids, not the text's tokenization
                for tag in (
                    "scenario",
                    "chosen_source",
                    "chosen_correct",
                    "rejected_sampler_logprob",
                    "edit_distance",
                    "first_diff",
                    "len_w",
                    "len_l",
                ):
                    assert r[tag] == p[tag], tag
                assert r["chosen_policy_logprob"] == pytest.approx(p["chosen_policy_logprob"], rel=1e-12)
    m = read_json(judged / "metrics/pairs.json")
    assert (m["source"], m["scenario"], m["exported"]) == (
        "judged",
        1,
        {"train": len(want["train"]), "test": len(want["test"])},
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_importing_the_export_round_trips(judged, fmt):
    before = run_pairs(judged)
    export_before = {s: pl.read_parquet(judged / f"data/pairs_trl/parquet/{s}.parquet") for s in ("train", "test")}
    shutil.copytree(judged / "data/pairs_trl", judged / "mine")
    for p in ("data/candidates.parquet", "data/candidates_other.parquet", "data/judge"):  # not read any more
        shutil.rmtree(judged / p) if (judged / p).is_dir() else (judged / p).unlink()
    after = run_pairs(judged, **import_params(f"mine/{fmt}"))
    # the same pairs, split and tags (the policy log-probs recomputed under the same policy)
    assert after.drop("chosen_policy_logprob", "rejected_policy_logprob").equals(
        before.drop("chosen_policy_logprob", "rejected_policy_logprob")
    )
    for c in ("chosen_policy_logprob", "rejected_policy_logprob"):
        assert after[c].to_list() == pytest.approx(before[c].to_list(), abs=1e-5)
    for s, df in export_before.items():
        again = pl.read_parquet(judged / f"data/pairs_trl/parquet/{s}.parquet")
        assert again.drop("chosen_policy_logprob", "rejected_policy_logprob").equals(
            df.drop("chosen_policy_logprob", "rejected_policy_logprob")
        )
    m = read_json(judged / "metrics/pairs.json")
    assert (m["source"], m["scenario"], m["rows_read"], m["quarantined"]["total"]) == (
        f"mine/{fmt}",
        "imported",
        N_PROMPTS,
        0,
    )


def test_a_users_file_bad_rows_fail_or_are_quarantined(judged):
    good = [
        {
            "prompt": f"What is {i} + {i}?",
            "chosen": f"Answer: {2 * i}",
            "rejected": f"Answer: {2 * i + 1}",
            "score_chosen": 9.0,
            "score_rejected": 2.0,
        }
        for i in range(6)
    ]
    bad = [{"prompt": "What is 1 + 1?", "chosen": "2"}, {"prompt": "x", "chosen": "2", "rejected": "2"}]
    path = judged / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:3] + bad + good[3:]))
    with pytest.raises(PairsFileError, match=f"{path}: line 4, field 'rejected': field 'rejected' is missing"):
        run_pairs(judged, **import_params(str(path)))
    assert not (judged / "data/pairs.parquet").exists()  # nothing half-written

    pairs = run_pairs(judged, **import_params(str(path), on_bad_rows="quarantine"))
    assert len(pairs) == 6 and set(pairs["chosen_source"]) == {"imported"} and set(pairs["scenario"]) == {0}
    assert pairs["chosen_correct"].is_null().all() and not pairs["chosen_policy_logprob"].is_null().any()
    q = [json.loads(line) for line in (judged / "data/pairs_quarantine.jsonl").read_text().splitlines()]
    assert [(r["file"], r["row"], r["field"], r["reason"]) for r in q] == [
        (str(path), 4, "rejected", "missing field"),
        (str(path), 5, "rejected", "chosen equals rejected"),
    ]
    m = read_json(judged / "metrics/pairs.json")
    assert (m["rows_read"], m["quarantined"]) == (
        8,
        {"total": 2, "by_reason": {"chosen equals rejected": 1, "missing field": 1}},
    )
    trl = pl.concat([pl.read_parquet(f) for f in (judged / "data/pairs_trl/parquet").iterdir()])
    assert set(trl["score_chosen"]) == {9.0}  # the file's own scores are carried to the export


def test_pairs_inputs_must_follow_the_source(judged):
    Params.parse(repo_params({"pairs": import_params("mine.jsonl")}))
    with pytest.raises(ConfigError, match=r"pairs.inputs: must be \['mine.jsonl', 'mine.jsonl', 'mi"):
        Params.parse(repo_params({"pairs": {"source": "mine.jsonl"}}))
    with pytest.raises(ConfigError, match=r"pairs.inputs: List should have at least 3 items"):
        Params.parse(repo_params({"pairs": {**import_params("mine.jsonl"), "inputs": ["mine.jsonl"] * 2}}))
    # judged: the stage checks them (the paths of other stages' outputs) before any work
    with pytest.raises(ValueError, match=r"pairs.inputs: must be \['data/candidates.parquet', "):
        run_pairs(judged, inputs=["mine.jsonl"] * 3)


@pytest.mark.slow  # importing TRL alone takes ~12 s of CPU after torch and transformers
def test_trl_dpo_trainer_trains_from_the_export(judged, tiny_model_dir):
    """TRL (the `bench` extra, installed by scripts/setup.sh) trains on the exported file as it is."""
    pytest.importorskip("trl")
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    run_pairs(judged)
    train = datasets.load_dataset(str(judged / "data/pairs_trl/jsonl"), cache_dir=str(judged / "hf-cache"))["train"]
    tok, model = loading.load_tokenizer(tiny_model_dir), loading.load_model(tiny_model_dir, "float32")
    before = [p.detach().clone() for p in model.parameters()]
    cfg = DPOConfig(
        output_dir=str(judged / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        beta=0.1,
        max_length=64,
        use_cpu=True,
        bf16=False,
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=train, processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # it trained on our pairs: chosen is the assistant turn after the chat template's prompt
    first = trainer.train_dataset[0]
    assert tok.decode(first["chosen_ids"], skip_special_tokens=True).strip() == train[0]["chosen"][0]["content"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_every_pair_has_ches_and_the_filter_drops_the_top_training_pairs(judged):
    full = run_pairs(judged)
    assert full["ches"].is_finite().all() and full["ches_norm"].is_finite().all()
    train = full.filter(pl.col("split") == "train").sort("ches", descending=True)
    filtered = run_pairs(judged, filter={"ches_top_percent": 50, "by": "ches"})
    k = len(train) // 2
    assert set(full["pair_id"]) - set(filtered["pair_id"]) == set(train["pair_id"][:k])
    assert (
        filtered.filter(pl.col("split") == "heldout")["pair_id"].to_list()
        == full.filter(pl.col("split") == "heldout")["pair_id"].to_list()
    )
    m = read_json(judged / "metrics/pairs.json")
    assert m["filtered"] == {"by": "ches", "top_percent": 50, "dropped": k, "threshold": train["ches"][k - 1]}
    assert m["n_train"] == len(train) - k


def test_constructed_source_edits_the_correct_candidates_and_counts_the_kinds(judged):
    """pairs.source constructed: each prompt's correct candidate against an edit of it, the kinds in turn,
    counted per kind and per distance bucket in the metrics; the export round-trips the tags."""
    pairs = run_pairs(judged, source="constructed", constructed={"chosen": ["policy"], "edits": ["final", "all"]})
    assert len(pairs) == N_PROMPTS and set(pairs["chosen_source"]) == {"policy"}
    assert (pairs["chosen_text"] == pl.Series([f"Answer: {2 * int(p[1:]) + 5}" for p in pairs["prompt_id"]])).all()
    assert not pairs["rejected_correct"].any() and set(pairs["scenario"]) == {0}
    assert (pairs["rejected_text"] != pairs["chosen_text"]).all()
    m = read_json(judged / "metrics/pairs.json")
    assert (m["source"], m["scenario"], m["n_pairs"]) == ("constructed", "constructed", N_PROMPTS)
    assert m["edits"] == dict(pairs["rejected_source"].value_counts().sort("rejected_source").iter_rows())
    for split in ("train", "heldout"):
        kinds = pairs.filter(pl.col("split") == split)["rejected_source"].value_counts()["count"]
        assert kinds.max() - kinds.min() <= 1  # the kinds take turns within each split
        assert sum(m["by_distance_bucket"][split].values()) == int((pairs["split"] == split).sum())
    export = pl.concat([pl.read_parquet(judged / f"data/pairs_trl/parquet/{s}.parquet") for s in ("train", "test")])
    assert export["score_chosen"].is_null().all() and export["score_rejected"].is_null().all()  # never judged
    assert sorted(export["rejected_source"]) == sorted(pairs["rejected_source"])
    # the judged inputs are its deps too: another list is refused, naming the key
    params = yaml.safe_load((judged / "params.yaml").read_text())
    params["pairs"]["inputs"] = ["a.jsonl"] * 3
    (judged / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from stages import pairs as stage

    with pytest.raises(ValueError, match="pairs.inputs: must be .* when pairs.source is 'constructed'"):
        stage.main(["--params", "params.yaml"])
