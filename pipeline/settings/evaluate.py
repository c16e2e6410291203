"""The ``evaluate:`` section: greedy test accuracy and held-out log-probs after training."""

from __future__ import annotations

from pydantic import Field, model_validator
from typing_extensions import Self

from pipeline.settings.base import ConfigError, StageParams, Strict
from pipeline.settings.policy import GenerationParams, PolicyParams


class EvaluateParams(Strict):
    generation: GenerationParams
    batch_size: int = Field(ge=1)
    # Also score the greedy answers 1-5 with the LLM judge of judge.llm ("5 points", "4 & 5 points").
    llm_rubric: bool


class BeforeAndAfter(StageParams):
    """The starting policy's evaluation and the trained one's, which must decode alike to be compared."""

    policy: PolicyParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def _same_decoder(self) -> Self:
        before, after = self.policy.eval.backend, self.evaluate.generation.backend
        if before != after:
            raise ConfigError(
                f"evaluate.generation.backend: {after!r} differs from policy.eval.backend {before!r}; "
                "accuracy before and after training must come from the same decoder"
            )
        return self
