"""The ``flows:`` section: how Prefect runs the DVC stages (retries, timeouts, sweeps, studies, rounds).

Kept beside the flows: no stage imports it and no stage has it as a DVC param, so changing a flow
setting, or this module, reruns no stage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.settings.base import DEFAULT_PARAMS, ConfigError, Strict, Unique, error_text


def group_of(stage: str) -> str:
    """``train@dpo`` -> ``train`` (a DVC foreach group); other names unchanged."""
    return stage.split("@", 1)[0]


class StageTaskSettings(Strict):
    """How the Prefect task of one DVC stage is run."""

    retries: int = Field(ge=0)  # extra tries after a failure (each one is `dvc repro -s <stage>` again)
    retry_delay_s: float = Field(ge=0)  # pause between tries
    timeout_s: float = Field(ge=0)  # wall-clock limit of one try, the DVC process group is killed; 0: none


class StageTaskOverride(Strict):
    """Per-stage (or per foreach group) changes to :class:`StageTaskSettings`; a key left out inherits."""

    retries: int | None = Field(None, ge=0)
    retry_delay_s: float | None = Field(None, ge=0)
    timeout_s: float | None = Field(None, ge=0)


class SweepParams(Strict):
    # param -> values; one DVC experiment per combination (the product)
    grid: dict[str, list[Any]]
    max_parallel: int = Field(ge=1)  # experiments running at once (`dvc exp run --temp` each)
    targets: list[str]  # stages to reproduce per point; []: the whole pipeline
    warm_start: bool  # first point alone, so the stages every point shares are computed once
    retries: int = Field(ge=0)  # per experiment
    timeout_s: float = Field(ge=0)  # per experiment; 0: none
    metrics: list[str]  # comparison-table columns, <file glob>:<dotted key glob>; []: every metric

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
        return v


class RoundsParams(Strict):
    count: int = Field(ge=1)  # rounds of sample -> judge -> pairs -> reference -> train -> evaluate
    variant: str  # the train.variants entry whose trained model starts the next round
    dir: str  # per-round copies of the outputs and the comparison report (git-ignored)
    save_experiments: bool  # also record each round as a DVC experiment <name>-round-<r>


Scenario = Literal[1, 2, 3, 4]
# the kind of machine a stage runs on (cluster_flow); multinode: train stages across machines, one JobSet each
ResourceClass = Literal["cpu", "gpu", "multinode"]


class ScenariosParams(Strict):
    """``python -m pipeline.flows scenarios``: one DVC experiment per ``pairs.scenario``, one train
    variant, compared side by side in a report."""

    list: Unique[Scenario] = Field(min_length=1)
    variant: str
    max_parallel: int = Field(ge=1)
    report: str
    timeout_s: float = Field(ge=0)
    retries: int = Field(ge=0)

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if not v or not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r} is not a train.variants name")
        return v


class TuneParams(Strict):
    """``python -m pipeline.flows study --tune``: each variant over its grid on one seed, the setting of each with
    the highest greedy accuracy on the validation prompts, then those settings over the study's seeds."""

    # variant -> its setting (train.variants.<variant>.<key>: lr, beta, dpop_lambda, ...) -> values; one
    # experiment per combination of a variant's values
    grid: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    seed: int  # train.seed of the grid's experiments
    n_val: int = Field(ge=1)  # prepare.n_val of every experiment of the tuning: the prompts it selects on
    report: str  # folder of report.md, summary.json and per_pair.parquet

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for variant, axes in v.items():
            if not axes:
                raise ValueError(f"{variant}: needs at least one setting to tune")
            for key, values in axes.items():
                if not values:
                    raise ValueError(f"{variant}.{key}: needs at least one value")
                if len(set(map(repr, values))) < len(values):
                    raise ValueError(f"{variant}.{key}: a value listed more than once")
        return v


class StudyParams(Strict):
    """``python -m pipeline.flows study``: training seeds x variants x pair sets, one DVC experiment per seed
    and pair set, then ``report`` (a folder) with mean ± sd across seeds, pooled per-pair statistics and
    one row per claim it can judge."""

    seeds: Unique[int] = Field(min_length=1)  # train.seed of each experiment
    sample_seed: bool  # also set sample.seed to the seed (new candidates, hence new pairs, per seed)
    variants: Unique[str] = Field(min_length=1)  # train.variants entries: evaluate@<v> of each is reproduced
    scenarios: Unique[Scenario]  # pairs.scenario values (judged pairs), one pair set each; []: the pairs of params.yaml
    overrides: dict[str, Any]  # params set in every experiment (the study's sizes), the `dvc exp run -S` grammar
    max_parallel: int = Field(ge=1)
    report: str
    timeout_s: float = Field(ge=0)
    retries: int = Field(ge=0)
    tune: TuneParams


class FlowParams(Strict):
    """The ``flows:`` section: how Prefect runs the DVC stages. No stage depends on it."""

    defaults: StageTaskSettings
    stages: dict[str, StageTaskOverride]  # stage name (train@dpo) or foreach group (train) -> overrides
    log_tail_lines: int = Field(ge=1)
    keep_overrides: bool
    remote: str | None
    git_remote: str | None
    report: str
    resources: dict[str, ResourceClass]  # stage or foreach group -> resource class (cluster_flow)
    deployments: dict[ResourceClass, str]  # resource class -> Prefect deployment (cluster_flow)
    sweep: SweepParams
    rounds: RoundsParams
    scenarios: ScenariosParams
    study: StudyParams

    def for_stage(self, stage: str) -> StageTaskSettings:
        merged = self.defaults.model_dump()
        for key in (group_of(stage), stage):
            if key in self.stages:
                merged.update({k: v for k, v in self.stages[key].model_dump().items() if v is not None})
        return StageTaskSettings(**merged)

    def resource_of(self, stage: str) -> ResourceClass:
        return self.resources.get(stage, self.resources.get(group_of(stage), "cpu"))


class FlowParamsError(ConfigError):
    """A bad setting under ``flows:`` in params.yaml; the message names the key."""


def parse_flow_params(raw: Any, source: str = DEFAULT_PARAMS) -> FlowParams:
    """The ``flows:`` section alone (the flows read it without validating the stages' sections)."""
    try:
        return FlowParams(**raw)
    except ValidationError as e:
        raise FlowParamsError(f"{source}: {error_text(e.errors()[0], 'flows')}") from None
    except TypeError:
        raise FlowParamsError(f"{source}: flows: must be a mapping") from None


def load_flow_params(repo: str | os.PathLike = ".") -> FlowParams:
    path = Path(repo) / DEFAULT_PARAMS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FlowParamsError(f"{path}: not found") from None
    return parse_flow_params(raw.get("flows") if isinstance(raw, dict) else None, str(path))
