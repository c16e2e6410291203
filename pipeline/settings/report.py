"""The ``report:`` section: the statistics behind every finding the report writes."""

from __future__ import annotations

from pydantic import Field

from pipeline.settings.base import Strict


class ReportParams(Strict):
    title: str
    alpha: float = Field(gt=0, lt=1)  # a finding is written only where its test's p-value is below this
    confidence: float = Field(gt=0.5, lt=1)  # level of every interval
    bootstrap_resamples: int = Field(ge=100)
    seed: int  # of the bootstrap
    drastic_drop_orders: float = Field(gt=0)  # the 3D-properties' drastic drop: median change, orders of magnitude
