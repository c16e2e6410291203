"""LoRA and QLoRA through peft (``train.lora``): the adapter training attaches to the base, and the
adapter and merged model the train stage saves.

A fresh adapter's ``B`` is zero, so before the first update the policy computes exactly the base's
function: the reference log-probs, which the reference stage computes from the same base
(:mod:`pipeline.model.quantised`), are what the disabled adapter gives, and the trainer's first-step check
holds. With ``load_in_4bit`` that base is bitsandbytes' 4-bit NF4 model in both stages (QLoRA), and the
saved model merges the adapter into its dequantised weights, the weights training computed with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.model import loading, quantised

if TYPE_CHECKING:
    from pipeline.settings.train import LoraParams

ADAPTER_DIR = "adapter"  # models/<variant>/adapter: peft's adapter_model.safetensors and adapter_config.json


def peft_config(lora: LoraParams):
    from peft import LoraConfig

    target: Any = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, task_type="CAUSAL_LM"
    )


def attach(model, lora: LoraParams, seed: int):
    """``model`` with a fresh adapter (its base frozen), or ``model`` itself when ``lora.r`` is 0. The
    adapter's ``A`` is drawn from ``seed``; its ``B`` is zero."""
    if not lora.r:
        return model
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, peft_config(lora))


def fresh_policy(base_dir: str | os.PathLike, dtype: str, device: str, lora: LoraParams):
    """A plain copy of the policy on the CPU in ``dtype`` to take trained weights, with a fresh adapter when
    ``lora.r`` (a 4-bit base quantised on ``device`` and dequantised: the weights training computed with)."""
    if lora.load_in_4bit:
        base = quantised.dequantised_base(base_dir, dtype, device, lora)
    else:
        base = loading.load_model(base_dir, dtype)
    return attach(base, lora, seed=0)


def is_adapter(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def record(model, lora: LoraParams) -> dict[str, Any] | None:
    """The adapter's settings and sizes for the model card, or None for a full fine-tune."""
    if not lora.r:
        return None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return {
        "method": "qlora" if lora.load_in_4bit else "lora",
        **lora.model_dump(),
        "trainable_parameters": n_train,
        "total_parameters": n_all,
        "path": ADAPTER_DIR,
    }


def save_and_merge(model, folder: Path):
    """Write ``model``'s adapter into ``folder/adapter`` (peft's files) and return the plain model with the
    adapter merged into its weights (``merge_and_unload``), which loads without peft."""
    model.save_pretrained(folder / ADAPTER_DIR)
    # peft also writes a placeholder card; the folder's own README.md is the model's card
    (folder / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    return model.merge_and_unload()
