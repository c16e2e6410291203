"""Stages `reference`, `train`, `evaluate` and `export` with `train.lora.r` > 0: models/<variant> holds the
adapter and the merged model, which evaluation and export load as any model; QLoRA is refused on CPU
before a model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from repo_utils import write_params
from safetensors.torch import load_file

from pipeline.model import card as model_card
from pipeline.model import loading
from pipeline.settings.base import ConfigError
from pipeline.training.lora import ADAPTER_DIR

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def params(workspace: Path, lora: dict) -> None:
    write_params(
        workspace / "params.yaml",
        {
            "policy": {"model": str(workspace / "models/policy")},
            "evaluate": {"generation": {"max_new_tokens": 4, "batch_size": 4}},
            "train": {"lr": 1e-2, "lora": lora},
        },
    )


def test_a_lora_run_saves_the_adapter_and_the_merged_model(workspace):
    from peft import PeftModel

    from stages import evaluate, export, reference, train

    params(workspace, LORA)
    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])
    (workspace / "metrics/policy.json").write_text(json.dumps({"test_accuracy": 0.0}))
    evaluate.main(["--params", "params.yaml", "--variant", "dpo"])
    export.main(["--params", "params.yaml", "--variant", "dpo"])

    model, adapter = Path("models/dpo"), Path("models/dpo") / ADAPTER_DIR
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    # the merged weights: the policy's where no adapter sat, moved where one did
    start, merged = load_file("models/policy/model.safetensors"), load_file(model / "model.safetensors")
    assert merged.keys() == start.keys()
    moved = {k for k in start if not torch.equal(start[k], merged[k])}
    assert moved and all(".q_proj." in k or ".v_proj." in k for k in moved)
    # the merged model is the policy with the adapter (fp32: to rounding)
    ids = torch.tensor([[1, 42, 7, 99, 3, 17]])
    plain = loading.load_model(model, "float32").eval()
    adapted = PeftModel.from_pretrained(loading.load_model("models/policy", "float32"), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    # the card records the adapter; training passed the first-step check against the precomputed reference
    rec = ModelCard.load(model / "README.md").data.to_dict()[model_card.KEY]
    assert rec["adapter"]["method"] == "lora" and rec["adapter"]["r"] == 8 and rec["adapter"]["path"] == ADAPTER_DIR
    assert 0 < rec["adapter"]["trainable_parameters"] < rec["adapter"]["total_parameters"]
    assert rec["training"]["ref_check"]["passed"] and rec["hyperparameters"]["lora"]["r"] == 8
    # evaluation and export took the merged folder as it is; the export holds the adapter too
    assert json.loads(Path("metrics/eval/dpo.json").read_text())["heldout"]["n_pairs"] == 4
    exported = Path("export/models/dpo")
    assert os.path.samefile(adapter / "adapter_model.safetensors", exported / ADAPTER_DIR / "adapter_model.safetensors")
    assert ModelCard.load(exported / "README.md").data.to_dict()[model_card.KEY]["adapter"] == rec["adapter"]


@pytest.mark.parametrize("stage", ["reference", "train"])
def test_4bit_is_refused_on_cpu_before_a_model_loads(workspace, monkeypatch, stage):
    import importlib

    from pipeline.model import quantised

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the check")

    monkeypatch.setattr(loading, "load_model", no_loading)
    monkeypatch.setattr(quantised, "load_base", no_loading)
    params(workspace, {**LORA, "load_in_4bit": True})
    argv = ["--params", "params.yaml"] + (["--variant", "dpo"] if stage == "train" else [])
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.lora\.load_in_4bit: true needs a CUDA GPU"):
        importlib.import_module(f"stages.{stage}").main(argv)


def test_qlora_trains_on_the_4bit_base_the_reference_scored(workspace, monkeypatch):
    """Where bitsandbytes is installed (the `qlora` extra): the reference and training share the 4-bit base, so
    the first step sees the reference exactly, and the saved model is the adapter merged into the dequantised
    base. Without a GPU, bitsandbytes' CPU backend stands in for this test only (the stages refuse the CPU)."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from pipeline.model import quantised
    from stages import reference, train

    if not torch.cuda.is_available():
        monkeypatch.setattr(quantised, "QUANTISED_DEVICES", ("cuda", "cpu"))
    params(workspace, {**LORA, "load_in_4bit": True})
    reference.main(["--params", "params.yaml"])
    train.main(["--params", "params.yaml", "--variant", "dpo"])

    rec = ModelCard.load("models/dpo/README.md").data.to_dict()[model_card.KEY]
    assert rec["training"]["ref_check"]["gap_max"] == 0.0 and rec["adapter"]["method"] == "qlora"
    assert "quantization_config" not in json.loads(Path("models/dpo/config.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lora = train.Settings.load("params.yaml").train.lora
    dequantised = quantised.dequantised_base("models/policy", "float32", device, lora)
    adapted = PeftModel.from_pretrained(dequantised, "models/dpo/adapter").eval()
    ids = torch.tensor([[1, 42, 7, 99, 3, 17]])
    with torch.no_grad():
        merged = loading.load_model("models/dpo", "float32").eval()(ids).logits
        torch.testing.assert_close(merged, adapted(ids).logits, atol=1e-5, rtol=1e-5)
