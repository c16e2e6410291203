"""The ``prepare:`` section: where the problems come from and how they are split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.settings.base import Strict


class ReasoningGymSource(Strict):
    task: str
    config: dict[str, Any]
    seed: int


class FileSource(Strict):
    path: str | None
    format: Literal["auto", "jsonl", "parquet"]
    # gsm8k: {question, answer: "<reasoning> #### <final>"}; math: {problem, solution with \boxed{}}
    preset: Literal["gsm8k", "math"] | None
    fields: dict[str, str | None]


class PrepareParams(Strict):
    source: Literal["reasoning_gym", "file"]
    reasoning_gym: ReasoningGymSource
    file: FileSource
    instruction: str
    n_train: int = Field(ge=1)
    n_test: int = Field(ge=1)
    n_warmup: int = Field(ge=0)
    n_val: int = Field(ge=0)  # validation prompts: neither trained on nor tested (the study's tuning mode)
    split_seed: int
    on_bad_rows: Literal["error", "quarantine"]
