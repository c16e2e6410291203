"""Picking a sampling backend by name; vLLM is imported only when selected, with params.yaml's settings."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from repo_utils import repo_params

from pipeline.generation import registry
from pipeline.settings.sampling import VLLMParams

VLLM = repo_params()["vllm"]


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'nope' \(available: \['transformers', 'vllm'\]\)"):
        registry.get_sampler("nope", "/nonexistent-model")


def test_selecting_vllm_without_it_fails_at_once_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match="vLLM is not installed"):
        registry.get_sampler("vllm", "/nonexistent-model", dtype="float32", vllm=VLLMParams(**VLLM))  # before any model
    with pytest.raises(ImportError, match="vLLM is not installed"):
        registry.sampler_for("vllm", "/nonexistent-model", dtype="float32", batch_size=8, vllm=VLLMParams(**VLLM))


def test_sampler_for_passes_each_backend_its_params(monkeypatch):
    calls = []
    monkeypatch.setitem(registry.SAMPLERS, "vllm", lambda path, **kw: calls.append(("vllm", path, kw)))
    monkeypatch.setitem(registry.SAMPLERS, "transformers", lambda path, **kw: calls.append(("tf", path, kw)))
    params = VLLMParams(**{**VLLM, "max_num_seqs": 7})
    registry.sampler_for("vllm", "m", dtype="bfloat16", batch_size=8, vllm=params, model_id="id")
    registry.sampler_for("transformers", "m", dtype="float32", batch_size=8, vllm=params)
    assert calls == [
        ("vllm", "m", {"dtype": "bfloat16", "model_id": "id", "vllm": params}),
        ("tf", "m", {"dtype": "float32", "batch_size": 8, "model_id": None}),
    ]
    with pytest.raises(ValueError, match="`vllm` section"):
        registry.sampler_for("vllm", "m", dtype="float32", batch_size=8, vllm=None)


def test_vllm_itself_is_imported_only_when_an_engine_starts():
    """The sample stage imports the backend's environment (its re-execution) and the registry its sampler
    module; none of the backend's modules imports vLLM (an optional extra) before an engine is built."""
    code = (
        "import sys, stages.sample\n"
        "from pipeline.generation.vllm_backend import engine, environment, pool, sampler\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
