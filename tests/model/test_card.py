"""pipeline/model/card.py: model cards that huggingface_hub parses, with the loss, the resolved
hyperparameters, the data fingerprint, and the evaluation figures once completed."""

from __future__ import annotations

import hashlib
import inspect

import polars as pl
import pytest
from huggingface_hub import ModelCard
from repo_utils import repo_params

from pipeline.model import card as model_card
from pipeline.settings.params import Params
from pipeline.training.losses import LOSSES

TRAINING = {
    "steps": 3,
    "world_size": 1,
    "last_step": {"loss": 0.6931471805599453, "lp_w": -12.25, "accuracy": 0.5},
    "ref_check": {"gap_per_token": 3e-7, "gap_max": 1.5e-5, "gap_mean": 4e-6, "tol": 0.1, "passed": True},
}
METRICS = {
    "variant": "mix",
    "test_accuracy": 0.3125,
    "test_accuracy_before": 0.25,
    "llm_rubric": None,
    "heldout": {
        "n_pairs": 5,
        "delta_w": -0.123456789,
        "delta_l": -2.5,
        "pair_accuracy": 0.8,
        "displaced_share": 0.6,
        "lp_w": -20.0,
        "by_distance": {
            "0-0.25": {"n": 0},
            "0.25-0.5": {"n": 5, "delta_w": -0.1, "delta_l": -2.5, "displaced_share": 0.6},
        },
    },
}


def _pairs(tmp_path, value: float):
    p = tmp_path / f"pairs-{value}.parquet"
    pl.DataFrame({"pair_id": ["a", "b"], "edit_distance_norm": [0.1, value]}).write_parquet(p)
    return p


@pytest.fixture
def variant():
    """A variant of two loss terms that overrides the shared learning rate, resolved by the config."""
    raw = repo_params(
        {
            "train": {
                "variants": {
                    "mix": {
                        "lr": 3.0e-4,
                        "loss": [
                            {"name": "dpop", "weight": 1.0, "beta": 0.2, "dpop_lambda": 5.0},
                            {"name": "simpo", "weight": 0.5, "beta": 2.0, "margin": 1.0},
                        ],
                    }
                }
            }
        }
    )
    return Params.parse(raw).train.variants["mix"]


@pytest.fixture
def trained(tmp_path, variant):
    data = model_card.data_fingerprint(
        _pairs(tmp_path, 0.5), _pairs(tmp_path, 0.9), n_train=7, n_heldout=2, scenarios=[2]
    )
    card = model_card.training_card(
        variant="mix",
        base_model="smollm2-135m-instruct",
        base_fingerprint="0123abcd",
        losses=[model_card.loss_record(t.name, t.weight, t.hp) for t in variant.losses],
        hyperparameters=variant.settings.model_dump(),
        data=data,
        training=TRAINING,
        adapter=None,
    )
    model_card.save(card, tmp_path / "README.md")
    return tmp_path / "README.md"


def test_training_card_parses_with_the_loss_and_resolved_hyperparameters(trained, variant):
    card = ModelCard.load(trained)
    d = card.data
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.library_name == "transformers"
    assert d.pipeline_tag == "text-generation" and {"dpo", "dpop", "simpo"} <= set(d.tags)
    rec = d.to_dict()[model_card.KEY]
    assert rec["hyperparameters"] == variant.settings.model_dump()
    assert rec["hyperparameters"]["lr"] == 3.0e-4  # the variant's override, not train.lr
    assert [(t["name"], t["weight"], t["hyperparameters"]) for t in rec["losses"]] == [
        (t.name, t.weight, t.hp) for t in variant.losses
    ]
    # the loss's description is the registry's docstring: formula first, then the paper
    dpop = rec["losses"][0]
    assert dpop["formula"].startswith("DPO-Positive:") and "2402.13228" in dpop["reference"]
    assert " ".join(inspect.getdoc(LOSSES["dpop"].fn).split()) == f"{dpop['formula']} {dpop['reference']}"
    assert rec["training"] == TRAINING and rec["evaluation"] is None and not d.eval_results
    # and the body shows them to a reader
    assert "## Loss" in card.text and "Smaug" in card.text and "| lr | 0.0003 |" in card.text
    assert "Not evaluated in this folder" in card.text
    assert rec["adapter"] is None and "## Adapter" not in card.text and "lora" not in d.tags
    # the first-step check is stated on the figure that decides it: the gap per token, against its tolerance
    assert (
        "|lp − ref| 3e-07 nats per token (tolerance 0.1, passed); per sequence mean 4e-06, largest 1.5e-05"
        in " ".join(card.text.split())
    )


def test_a_lora_card_records_the_adapter(tmp_path, variant):
    adapter = {
        "method": "lora",
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "load_in_4bit": False,
        "trainable_parameters": 1234,
        "total_parameters": 99999,
        "path": "adapter",
    }
    card = model_card.training_card(
        variant="mix",
        base_model="smollm2-135m-instruct",
        base_fingerprint="0123abcd",
        losses=[model_card.loss_record(t.name, t.weight, t.hp) for t in variant.losses],
        hyperparameters=variant.settings.model_dump(),
        data=model_card.data_fingerprint(_pairs(tmp_path, 0.5), _pairs(tmp_path, 0.9), n_train=7, n_heldout=2,
                                         scenarios=[2]),
        training=TRAINING,
        adapter=adapter,
    )  # fmt: skip
    model_card.save(card, tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict()[model_card.KEY]["adapter"] == adapter and {"lora", "peft"} <= set(loaded.data.tags)
    text = " ".join(loaded.text.split())
    assert "Trained as a LoRA adapter (peft) of rank 16 (alpha 32, dropout 0.05) on `q_proj, v_proj`" in text
    assert "1234 of 99999 parameters trained" in text and "PeftModel.from_pretrained(" in text
    # the adapter survives the evaluation's completion of the card
    done = model_card.with_evaluation(loaded, METRICS, source="metrics/eval/mix.json")
    assert done.data.to_dict()[model_card.KEY]["adapter"] == adapter and "## Adapter" in done.text


def test_data_fingerprint_hashes_the_files_and_changes_with_the_pairs(tmp_path):
    pairs, ref = _pairs(tmp_path, 0.5), _pairs(tmp_path, 0.9)
    fp = model_card.data_fingerprint(pairs, ref, n_train=7, n_heldout=2, scenarios=[2, 1, 2])
    assert fp["pairs"]["sha256"] == hashlib.sha256(pairs.read_bytes()).hexdigest()
    assert fp["reference"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert (fp["n_pairs_train"], fp["n_pairs_heldout"], fp["scenarios"]) == (7, 2, [1, 2])
    changed = model_card.data_fingerprint(_pairs(tmp_path, 0.25), ref, n_train=7, n_heldout=2, scenarios=[2])
    assert changed["pairs"]["sha256"] != fp["pairs"]["sha256"]
    assert changed["reference"] == fp["reference"]


def test_evaluation_completes_the_card(trained, tmp_path):
    card = model_card.with_evaluation(model_card.load(trained), METRICS, source="metrics/eval/mix.json")
    model_card.save(card, tmp_path / "out.md")
    loaded = ModelCard.load(tmp_path / "out.md")
    rec = loaded.data.to_dict()[model_card.KEY]
    assert rec["evaluation"] == METRICS and rec["evaluation_source"] == "metrics/eval/mix.json"
    assert rec["training"] == TRAINING  # the training record is kept
    # the headline figures as the Hub's model-index results
    results = {(r.dataset_split, r.metric_name): r.metric_value for r in loaded.data.eval_results}
    assert results[("test", "greedy test accuracy")] == METRICS["test_accuracy"]
    assert results[("heldout", "held-out pair accuracy (Δw > Δl)")] == METRICS["heldout"]["pair_accuracy"]
    assert len(results) == 5 and loaded.data.model_name == "mix"
    assert "| greedy test accuracy | 0.3125 |" in loaded.text and "| held-out delta_w | -0.1235 |" in loaded.text
    assert "| 0.25-0.5 | 5 | -0.1 | -2.5 | 0.6 |" in loaded.text


def test_evaluation_of_another_variant_or_a_card_without_record_is_refused(trained, tmp_path):
    with pytest.raises(model_card.ModelCardError, match="metrics/eval/dpo.json: variant 'dpo' evaluated"):
        model_card.with_evaluation(
            model_card.load(trained), {**METRICS, "variant": "dpo"}, source="metrics/eval/dpo.json"
        )
    (tmp_path / "plain.md").write_text("---\nlicense: mit\n---\n# a model\n")
    with pytest.raises(model_card.ModelCardError, match="no 'dpo_pipeline' training record"):
        model_card.with_evaluation(model_card.load(tmp_path / "plain.md"), METRICS, source="m.json")
    with pytest.raises(model_card.ModelCardError, match="nothere/README.md: no model card"):
        model_card.load(tmp_path / "nothere/README.md")


def test_base_model_is_a_hub_id_or_left_out():
    assert model_card.base_model_id("hf:org/name") == "org/name"
    assert model_card.base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_card.base_model_id("/data/models/mine") is None
