"""The ``pairs:`` section: where chosen and rejected come from, the held-out split and the CHES filter."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from pipeline.settings.base import Strict, Unique


class PairsFilter(Strict):
    """CHES's mitigation (Razin et al. 2025): drop the training pairs with the highest CHES."""

    ches_top_percent: float = Field(ge=0, lt=100)  # 0: keep every pair
    by: Literal["ches", "ches_norm"]


class PairsConstructed(Strict):
    """``pairs.source: constructed``: correct responses and controlled edits of them (pipeline/data/edits.py)."""

    chosen: Unique[Literal["policy", "gold"]] = Field(min_length=1)  # first source with a correct response
    edits: Unique[Literal["final", "step", "all"]] = Field(min_length=1)  # taken in turn by a split's prompts


class PairsParams(Strict):
    scenario: Literal[1, 2, 3, 4]
    heldout_fraction: float = Field(ge=0, lt=1)
    seed: int
    # Edges of the normalised-edit-distance buckets used by evaluate and the report.
    distance_buckets: list[float]
    # "judged" (the judge's picks among the sampled candidates), "constructed" (a correct response and a
    # controlled edit of it, `constructed` below) or the path of a pairs file or folder in TRL's
    # preference format (pipeline/data/trl_format.py).
    source: str = Field(min_length=1)
    # The stage's DVC data deps, interpolated into dvc.yaml (which cannot choose deps by a value), so
    # they must follow `source`: a file's checked here, before any stage runs; the judged ones (paths
    # of other stages' outputs, which this module does not know) by the pairs stage.
    inputs: list[str] = Field(min_length=3, max_length=3)
    on_bad_rows: Literal["error", "quarantine"]  # of a pairs file
    filter: PairsFilter
    constructed: PairsConstructed

    @field_validator("distance_buckets")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if sorted(v) != v or any(not 0 < x < 1 for x in v):
            raise ValueError("must be increasing values strictly between 0 and 1")
        return v

    @field_validator("inputs")
    @classmethod
    def _inputs_follow_source(cls, v: list[str], info: ValidationInfo) -> list[str]:
        source = info.data.get("source")
        if source in (None, "judged", "constructed"):
            return v  # source itself is invalid (that error is reported), or the stage checks
        if any(os.path.normpath(p) != os.path.normpath(source) for p in v):
            raise ValueError(
                f"must be {[source] * 3} when pairs.source is {source!r} (the stage's DVC deps: your "
                "file in each slot, so that no sampling or judging runs)"
            )
        return v
