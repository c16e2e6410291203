"""The starting policy as training's base: in ``policy.dtype``, or quantised to 4 bits (QLoRA,
``train.lora.load_in_4bit``) where bitsandbytes runs.

The reference stage and the train stage load the base through :func:`load_base` alike, so the reference
log-probs are those of the very model a fresh LoRA adapter sits on.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from pipeline.model import loading
from pipeline.settings.base import ConfigError

if TYPE_CHECKING:
    from pipeline.settings.train import LoraParams

# Device types whose 4-bit layers bitsandbytes runs for training; the pipeline refuses load_in_4bit elsewhere.
QUANTISED_DEVICES = ("cuda",)


def check_support(lora: LoraParams, device: str, source: str) -> None:
    """Raise :class:`ConfigError` naming ``train.lora.load_in_4bit`` when it is on and this process cannot
    run 4-bit layers (no CUDA device, or no bitsandbytes): called at a stage's start, before a model loads."""
    if not lora.load_in_4bit:
        return
    key = f"{source}: train.lora.load_in_4bit"
    if torch.device(device).type not in QUANTISED_DEVICES:
        raise ConfigError(
            f"{key}: true needs a CUDA GPU (bitsandbytes' 4-bit layers), but this stage runs on {device!r}; "
            "set it to false to train the adapter on the full-precision base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key}: true needs bitsandbytes: pip install 'dpo-pipeline[qlora]'")


def quantisation_config(dtype: str):
    """QLoRA's 4-bit NF4 with double quantisation (Dettmers et al. 2023), computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def load_base(path: str | os.PathLike, dtype: str, device: str, lora: LoraParams):
    """The model in ``path`` in ``dtype`` on ``device``, or quantised to 4 bits on it with
    ``lora.load_in_4bit`` (after :func:`check_support`)."""
    if not lora.load_in_4bit:
        return loading.load_model(path, dtype, device)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), quantization_config=quantisation_config(dtype), device_map=device
    )


def dequantised_base(path: str | os.PathLike, dtype: str, device: str, lora: LoraParams):
    """The 4-bit base (quantised on ``device``) with its weights dequantised to ``dtype``, on the CPU: the
    weights a QLoRA run computed with."""
    base = load_base(path, dtype, device, lora)
    return base.dequantize(dtype=getattr(torch, dtype)).to("cpu")
