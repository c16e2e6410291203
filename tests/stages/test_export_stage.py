"""Stages `train` and `export`: the trained model folder carries a Hugging Face model card (loss, resolved
hyperparameters, data fingerprint, training figures), and `export/models/<variant>` is that folder with the
card completed by the evaluation figures, loading as the trained model does."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from repo_utils import write_params

from pipeline.io import read_json
from pipeline.model import card as model_card
from pipeline.settings.params import Params

LR = 3.0e-4  # the variant's own learning rate (train.lr is shared by the others)


@pytest.fixture
def trained(workspace):
    """train@dpo (with its own lr), evaluate@dpo and export@dpo run in the workspace, as DVC runs them."""
    from stages import evaluate, export, reference, train

    write_params(
        workspace / "params.yaml",
        {
            "policy": {"model": str(workspace / "models/policy")},
            "evaluate": {"generation": {"max_new_tokens": 4, "batch_size": 4}},
            "train": {"variants": {"dpo": {"lr": LR}}},
        },
    )
    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])
    (workspace / "metrics/policy.json").write_text(json.dumps({"test_accuracy": 0.0}))
    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    export.main(["--params", "params.yaml", "--variant", "dpo"])
    return workspace


@pytest.mark.slow  # reference, train, evaluate and export in turn (test_e2e checks the cards on every `dvc repro`)
def test_trained_and_exported_model_cards(trained):
    from transformers import AutoModelForCausalLM

    from pipeline.paths import export_dir

    cfg = Params.load("params.yaml")
    variant = cfg.train.variants["dpo"]
    model, exported = Path("models/dpo"), Path(export_dir("dpo"))

    # models/dpo: the training card
    card = ModelCard.load(model / "README.md")
    rec = card.data.to_dict()[model_card.KEY]
    assert card.data.library_name == "transformers" and {"dpo"} <= set(card.data.tags)
    assert card.data.base_model is None  # the policy is a local folder, not a Hub model
    assert rec["hyperparameters"] == variant.settings.model_dump() and rec["hyperparameters"]["lr"] == LR
    assert [(t["name"], t["weight"], t["hyperparameters"]) for t in rec["losses"]] == [("dpo", 1.0, {"beta": 0.1})]
    assert rec["data"]["pairs"]["sha256"] == hashlib.sha256(Path("data/pairs.parquet").read_bytes()).hexdigest()
    assert rec["data"]["reference"]["sha256"] == hashlib.sha256(Path("data/reference.parquet").read_bytes()).hexdigest()
    assert (rec["data"]["n_pairs_train"], rec["data"]["n_pairs_heldout"], rec["data"]["scenarios"]) == (4, 4, [1])
    live = read_json("dvclive/train/dpo/metrics.json")  # dvclive's summary: the last step's figures
    assert rec["training"]["last_step"]["loss"] == live["loss"] and rec["training"]["ref_check"] == live["ref_check"]
    assert rec["evaluation"] is None

    # export/models/dpo: the same files, the card completed with metrics/eval/dpo.json
    metrics = read_json("metrics/eval/dpo.json")
    out = ModelCard.load(exported / "README.md")
    out_rec = out.data.to_dict()[model_card.KEY]
    assert out_rec["evaluation"] == metrics and out_rec["evaluation_source"] == "metrics/eval/dpo.json"
    assert {k: v for k, v in out_rec.items() if not k.startswith("evaluation")} == {
        k: v for k, v in rec.items() if not k.startswith("evaluation")
    }
    assert {(r.metric_name, r.metric_value) for r in out.data.eval_results} >= {
        ("greedy test accuracy", metrics["test_accuracy"]),
        ("held-out pair accuracy (Δw > Δl)", metrics["heldout"]["pair_accuracy"]),
    }
    assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in model.iterdir())
    weights = model / "model.safetensors"
    assert os.path.samefile(weights, exported / weights.name)  # a hard link: no second copy on disk

    # loads as a transformers model with the trained model's logits
    ids = torch.tensor([[1, 42, 7, 99, 3]])
    a = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    b = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_export_names_what_is_missing(workspace):
    import shutil

    from stages import export

    shutil.copytree("models/policy", "models/dpo")  # a model folder without a card
    (workspace / "metrics/eval").mkdir(parents=True)
    (workspace / "metrics/eval/dpo.json").write_text(json.dumps({"variant": "dpo", "test_accuracy": 0.0}))
    with pytest.raises(model_card.ModelCardError, match="models/dpo/README.md: no model card"):
        export.main(["--params", "params.yaml", "--variant", "dpo"])
    with pytest.raises(ValueError, match="train.variants.nope: no such variant"):
        export.main(["--params", "params.yaml", "--variant", "nope"])
    assert not Path("export").exists()
