"""The ``toy:`` section: the toy model of the 3D-properties paper (:mod:`pipeline.analysis.toy`), kept beside
it so that only the toy stage depends on it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from pipeline.settings.base import Strict, Unique
from pipeline.training.loss_hparams import LOSS_HPARAMS, LOSS_NAMES, LossConfigError, validate_loss_hparams

TOY_REJECTED = 4  # responses 4-7 are the rejected ones (pipeline/analysis/toy.py)


class ScenarioInit(Strict):
    """The toy's SFT target for one scenario, the same for every prompt ``i``: ``p_chosen`` on response
    ``i``, ``p_rejected`` on EACH of the rejected responses 4–7, the rest spread evenly over the
    other five (the three other prompts' chosen responses and the two unseen ones)."""

    p_chosen: float = Field(gt=0, lt=1)
    p_rejected: float = Field(gt=0, lt=1 / TOY_REJECTED)

    @model_validator(mode="after")
    def _mass_left(self) -> Self:
        rest = 1.0 - self.p_chosen - TOY_REJECTED * self.p_rejected
        if rest <= 0:
            raise ValueError(f"p_chosen + {TOY_REJECTED}·p_rejected must be < 1 (got {1.0 - rest:g})")
        return self


class ToyParams(Strict):
    """The ``toy:`` section: the toy model of the 3D-properties paper (pipeline/analysis/toy.py)."""

    steps: int = Field(ge=1)  # preference-optimisation steps (full batch, all pairs)
    lr: float = Field(gt=0)
    optimizer: Literal["adam", "sgd"]  # preference step; SFT always uses Adam
    sft_steps: int = Field(ge=1)
    sft_lr: float = Field(gt=0)
    hidden: int = Field(ge=1)
    seeds: Unique[int] = Field(min_length=1)  # each: MLP init + the draw of the rejected responses
    confidence: float = Field(gt=0, lt=1)  # of the t intervals of the changes across seeds
    pairs_per_prompt: int = Field(ge=1)
    losses: Unique[str]
    hparams: dict[str, dict[str, Any]]  # one entry per loss in `losses`, every hyperparameter given
    scenarios: Unique[int]
    scenario_init: dict[int, ScenarioInit]

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in LOSS_HPARAMS:
                raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in self.losses:
            if name not in self.hparams:
                raise ValueError(f"hparams.{name}: missing (every loss in toy.losses needs its hyperparameters)")
        for name, hp in self.hparams.items():
            try:
                validate_loss_hparams(name, hp)
            except LossConfigError as e:
                raise ValueError(f"hparams.{name}{'.' + e.key if e.key else ''}: {e}") from None
        for s in self.scenarios:
            if s not in self.scenario_init:
                raise ValueError(f"scenarios: {s} has no entry in scenario_init")
        return self
