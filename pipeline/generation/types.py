"""What every sampling backend shares: the decoding settings, the candidate record and the
:class:`Sampler` interface.

A leaf module: it imports nothing from the project, so the backends, the registry and the callers
can all import it without importing one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How to decode. Every value comes from params.yaml (``sample``, ``sample_other``,
    ``policy.eval``, ``evaluate.generation``): no field has a default."""

    n: int  # candidates per prompt
    temperature: float  # 0 means greedy
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def greedy(cls, max_new_tokens: int) -> GenerationSettings:
        """Greedy decoding: one candidate, the most likely token at each step (``top_p`` and ``seed``
        play no part)."""
        return cls(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)


@dataclass(frozen=True)
class Candidate:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, ending with EOS when finish_reason == "stop"
    logprob_sum: float  # summed log-prob of token_ids under the model's own distribution (T = 1)
    finish_reason: str  # "stop" | "length"


class Sampler(Protocol):
    model_id: str

    def generate(
        self, prompts: Sequence[str], settings: GenerationSettings, progress: str | None = "sampling"
    ) -> list[list[Candidate]]:
        """Return ``settings.n`` candidates for each prompt, in prompt order."""

    def close(self) -> None:
        """Free the model / engines (GPU memory) before the caller loads another model."""
