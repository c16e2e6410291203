"""pipeline/model/quantised.py: the 4-bit base (QLoRA) is refused, naming its key, where bitsandbytes cannot
run it; without it the base is the policy as it is."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading, quantised
from pipeline.settings.base import ConfigError
from pipeline.settings.train import LoraParams


def lora(**overrides) -> LoraParams:
    return LoraParams(**{**repo_params()["train"]["lora"], **overrides})


def test_4bit_is_refused_on_cpu_naming_the_key():
    with pytest.raises(ConfigError, match=r"^params\.yaml: train\.lora\.load_in_4bit: true needs a CUDA GPU .* 'cpu'"):
        quantised.check_support(lora(r=8, load_in_4bit=True), "cpu", "params.yaml")
    quantised.check_support(lora(r=8), "cpu", "params.yaml")  # LoRA on a full-precision base runs anywhere


def test_4bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"train\.lora\.load_in_4bit: true needs bitsandbytes: pip install"):
        quantised.check_support(lora(r=8, load_in_4bit=True), "cuda:1", "p.yaml")


def test_without_4bit_the_base_is_the_policy(tiny_model_dir):
    a = quantised.load_base(tiny_model_dir, "float32", "cpu", lora(r=8))
    b = loading.load_model(tiny_model_dir, "float32")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
