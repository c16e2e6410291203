"""Typed configuration, parsed once from ``params.yaml``.

Every setting of the pipeline lives in ``params.yaml``; stages call :func:`load_params` and get a
validated :class:`Params`. Any problem (unknown key, wrong type, missing model folder, unknown loss
or loss hyperparameter) raises :class:`ConfigError` whose message names the offending key, e.g.
``params.yaml: train.variants.dpo.beta: Input should be a valid number``.

``params.yaml`` is also the one source of every default: no field here has a default value (a key
missing from the file is an error that names it), and no other module repeats a value that
params.yaml sets. This module is the ground floor of the package: it imports pydantic, yaml and
the two leaf tables it validates against (:mod:`pipeline.model.builtin`, the loss
hyperparameters below), never torch, so every stage can load its params in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import math
import numbers
from collections.abc import Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.model.builtin import BUILTIN_MODELS

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A bad setting in params.yaml; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- prepare
class ReasoningGymSource(_Strict):
    task: str
    config: dict[str, Any]
    seed: int


class FileSource(_Strict):
    path: str | None
    format: Literal["auto", "jsonl", "parquet"]
    # gsm8k: {question, answer: "<reasoning> #### <final>"}; math: {problem, solution with \boxed{}}
    preset: Literal["gsm8k", "math"] | None
    fields: dict[str, str | None]


class PrepareParams(_Strict):
    source: Literal["reasoning_gym", "file"]
    reasoning_gym: ReasoningGymSource
    file: FileSource
    instruction: str
    n_train: int = Field(ge=1)
    n_test: int = Field(ge=1)
    n_warmup: int = Field(ge=0)
    split_seed: int
    on_bad_rows: Literal["error", "quarantine"]


# --------------------------------------------------------------------------------------------- policy
class GenerationParams(_Strict):
    """Greedy decoding of the test prompts (policy.eval before training, evaluate.generation after)."""
    backend: Literal["transformers", "vllm"]
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # transformers: sequences per generate call


class WarmupParams(_Strict):
    enabled: bool
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=8)
    seed: int
    bf16: bool  # bf16 autocast where train.bf16 would use it (GPUs, CPUs with native bf16)


class PolicyParams(_Strict):
    # A builtin name ("smollm2-135m-instruct"), a local model folder, or "hf:<org>/<name>" (network).
    model: str
    dtype: Literal["float32", "bfloat16"]
    warmup: WarmupParams
    eval: GenerationParams


# --------------------------------------------------------------------------------------------- sample
class SampleParams(_Strict):
    backend: Literal["transformers", "vllm"]
    n: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # transformers: sequences per generate call
    seed: int
    # Prompts per saved chunk: a killed stage reruns only the chunks it had not finished.
    chunk_size: int = Field(ge=1)
    # Candidates whose sampler log-prob is re-computed by the training code (the difference is reported).
    logprob_check: int = Field(ge=0)
    # Finished chunks, outside every DVC output (a relative path is taken from the repository root,
    # also from a `dvc exp` temp workspace); not a DVC param, changing it reruns nothing.
    cache_dir: str


class OtherSampleParams(SampleParams):
    """Candidates of another model: the rejected side of scenarios 3 and 4 (stage sample_other)."""
    # A builtin name, a local model folder or hf:<org>/<name>. Sampled only when pairs.scenario is 3
    # or 4; otherwise the stage writes an empty table.
    model: str


class VLLMParams(_Strict):
    """vLLM engines (sample.backend / sample_other.backend / *.eval backend: vllm). How to run, not
    what: not a DVC param of any stage."""
    tensor_parallel_size: int = Field(ge=1)  # GPUs per engine
    data_parallel_size: int = Field(ge=0)  # engines, each on a shard of the prompts; 0: all visible GPUs
    gpu_memory_utilization: float = Field(gt=0, le=1)
    max_model_len: int = Field(ge=16)  # prompt + response tokens per sequence
    max_num_seqs: int = Field(ge=1)  # sequences per engine step
    enforce_eager: bool  # false: torch.compile (faster on GPUs, slow to start on small CPUs)
    cpu_kvcache_space_gb: float = Field(gt=0)  # CPU build only (VLLM_CPU_KVCACHE_SPACE)
    # KV-cache block in tokens (null: vLLM's own, 128 on the CPU build). Prefix caching shares only full
    # blocks, so the n candidates of a prompt share its prefill only up to a multiple of this.
    block_size: int | None = Field(ge=1)

    def sampler_kwargs(self) -> dict:
        return self.model_dump()


# --------------------------------------------------------------------------------------------- judge
class JudgePrice(_Strict):
    """US dollars per 1,000 tokens; only used for the estimated cost in metrics and the dry run."""
    input_per_1k: float = Field(ge=0)
    output_per_1k: float = Field(ge=0)


class LLMJudgeParams(_Strict):
    """An LLM judge behind any OpenAI-compatible Chat Completions endpoint (see pipeline/judging/llm/)."""
    # rubric: every candidate scored 1-5 on its own; listwise: the N candidates shown together (in a
    # seeded shuffled order), the judge names the best and the worst.
    mode: Literal["rubric", "listwise"]
    model: str
    base_url: str | None  # None: OpenAI; e.g. http://localhost:8000/v1 for a vLLM server
    # The NAME of the environment variable that holds the key, never the key; null: no key (a local
    # server without auth).
    api_key_env: str | None
    show_reference: bool  # show the gold final answer to the judge
    temperature: float = Field(ge=0, le=2)
    max_tokens: int = Field(ge=1)
    timeout_s: float = Field(gt=0)  # per HTTP attempt; a timeout is retried by the client
    max_in_flight: int = Field(ge=1)  # concurrent requests
    max_retries: int = Field(ge=0)  # client retries on 408/409/429/5xx/timeouts (backoff, jitter, Retry-After)
    max_parse_retries: int = Field(ge=0)  # extra requests after a malformed answer, then a failure
    # A group with a failed candidate: drop_group (status failed) or ignore_failed (judge the group on
    # the candidates that got a score; failed if fewer than 2). Listwise failures fail the whole group.
    on_failure: Literal["drop_group", "ignore_failed"]
    # Abort (no outputs, answers kept in the cache) when more than this share of requests failed.
    max_failed_fraction: float = Field(ge=0, le=1)
    seed: int  # shuffle of the candidate order shown to the judge (listwise)
    structured_output: bool  # ask for a JSON schema; falls back to plain text if the server refuses
    prices: dict[str, JudgePrice]  # model -> price
    # Answer cache, outside every DVC output so that `dvc repro` never deletes it. A relative path is
    # taken from the repository root (also from a `dvc exp run --temp`/queue workspace under
    # .dvc/tmp/exps, which is resolved back to the main repository); the environment variable
    # DPO_JUDGE_CACHE, or an absolute path here, overrides it.
    cache_dir: str
    dry_run: bool  # print the number of requests and estimated tokens, send nothing

    @model_validator(mode="before")
    @classmethod
    def _key_env_is_a_name(cls, data: Any) -> Any:
        # Checked on the whole mapping so that a pasted key is never echoed in the error message.
        name = data.get("api_key_env") if isinstance(data, dict) else None
        if name is not None and not (isinstance(name, str) and name.isascii() and name.isidentifier()
                                 and len(name) <= 128):
            raise ValueError("api_key_env must be the name of an environment variable (e.g. OPENAI_API_KEY), "
                             "not the key itself")
        return data


class JudgeParams(_Strict):
    backend: Literal["rule", "llm"]
    # Minimum score gap between best and worst; groups below it count as ties and are dropped.
    min_gap: float = Field(gt=0)
    llm: LLMJudgeParams


# --------------------------------------------------------------------------------------------- pairs
class PairsFilter(_Strict):
    """CHES's mitigation (Razin et al. 2025): drop the training pairs with the highest CHES."""
    ches_top_percent: float = Field(ge=0, lt=100)  # 0: keep every pair
    by: Literal["ches", "ches_norm"]


class PairsConstructed(_Strict):
    """``pairs.source: constructed``: correct responses and controlled edits of them (pipeline/data/edits.py)."""
    chosen: list[Literal["policy", "gold"]] = Field(min_length=1)  # first source with a correct response
    edits: list[Literal["final", "step", "all"]] = Field(min_length=1)  # taken in turn by the prompts of a split

    @field_validator("chosen", "edits")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("must not repeat a value")
        return v


class PairsParams(_Strict):
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
    # of other stages' outputs, which this module does not import) by the pairs stage.
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
    def _inputs_follow_source(cls, v: list[str], info) -> list[str]:
        source = info.data.get("source")
        if source in (None, "judged", "constructed"):
            return v  # source itself is invalid (that error is reported), or the stage checks
        if any(os.path.normpath(p) != os.path.normpath(source) for p in v):
            raise ValueError(f"must be {[source] * 3} when pairs.source is {source!r} (the stage's DVC deps: your "
                             "file in each slot, so that no sampling or judging runs)")
        return v


class ReferenceParams(_Strict):
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=8)  # must equal train.max_length (checked): both truncate alike


# --------------------------------------------------------------------------------------------- train


class LossTerm(_Strict):
    name: str
    weight: float
    hp: dict[str, float]


class TrainSettings(_Strict):
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # global batch in pairs, independent of processes
    grad_accum: int = Field(ge=1)
    max_length: int = Field(ge=8)  # must equal reference.max_length, in every variant (checked)
    seed: int
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    # bf16 autocast on GPUs and CPUs with native bf16 (else fp32), for training, the reference and evaluation's log-probs alike;
    # a variant may not change it (the reference is computed once for all variants).
    bf16: bool
    # One row per pair, prompt + chosen + rejected, the rejected masked from the chosen (the prompt is run
    # once); false: each response after its own copy of the prompt. Training, the reference and evaluation
    # alike; a variant may not change it (the reference is computed once for all variants).
    shared_prompt: bool
    # Largest |lp − ref| (nats per sequence) allowed on the first step of a fresh run, where the policy
    # is the reference; above it training fails (reference computed differently).
    ref_check_tol: float = Field(gt=0)
    # drop: each epoch's short last batch is dropped, so every step sees batch_size pairs; keep: trained
    tail: Literal["drop", "keep"]
    # Fixed sets (all held-out pairs and eval_train_pairs training pairs) scored at step 0, every K steps
    # and after the last step (0: off); the probe prompts' greedy decode every probe_every steps likewise.
    eval_every: int = Field(ge=0)
    eval_train_pairs: int = Field(ge=0)
    probe_every: int = Field(ge=0)
    probe_prompts: int = Field(ge=1)


class RuntimeParams(_Strict):
    """How to run, not what to compute: not a DVC param of the train stage, so changing it reruns nothing."""

    nproc: int = Field(ge=1)  # processes; > 1 relaunches the stage under torchrun
    backend: Literal["auto", "nccl", "gloo"]  # auto: nccl on GPUs, gloo on CPU
    strategy: Literal["ddp", "fsdp"]  # fsdp: FSDP2 fully_shard, for models that do not fit one GPU
    checkpoint_every: int = Field(ge=0)  # steps between checkpoints (0: none); a rerun resumes
    checkpoint_dir: str


TRAIN_SETTINGS = tuple(TrainSettings.model_fields)


class Variant(_Strict):
    name: str
    losses: tuple[LossTerm, ...]
    settings: TrainSettings


class TrainParams(TrainSettings):
    """Settings shared by all variants (a variant may override any but ``max_length``, ``bf16`` and
    ``shared_prompt``, which the reference shares), the runtime, and the variants."""

    runtime: RuntimeParams
    variants: dict[str, Any]


# --------------------------------------------------------------------------------------------- rest
class EvaluateParams(_Strict):
    generation: GenerationParams
    batch_size: int = Field(ge=1)
    # Also score the greedy answers 1-5 with the LLM judge of judge.llm ("5 points", "4 & 5 points").
    llm_rubric: bool


# --------------------------------------------------------------------------------------------- losses
class LossConfigError(ValueError):
    """A bad loss name or hyperparameter. ``.key`` names the hyperparameter (None: the loss name)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_POSITIVE = (0.0, False, math.inf)  # (low, low inclusive, high exclusive): > 0
_NONNEG = (0.0, True, math.inf)  # >= 0
_SMOOTHING = (0.0, True, 0.5)  # [0, 0.5)

# Each loss's hyperparameters and their allowed ranges: the typed configuration of
# pipeline/training/losses.py, whose registry binds each name to its function (a test checks that
# both agree). Kept here, free of torch, so that params.yaml is validated whole before any stage runs.
LOSS_HPARAMS: dict[str, dict[str, tuple[float, bool, float]]] = {
    "dpo": {"beta": _POSITIVE},
    "cdpo": {"beta": _POSITIVE, "label_smoothing": _SMOOTHING},
    "dpop": {"beta": _POSITIVE, "dpop_lambda": _NONNEG},
    "ipo": {"tau": _POSITIVE},
    "slic": {"delta": _NONNEG, "reg_weight": _NONNEG},
    "flex_dpo": {"beta_w": _POSITIVE, "beta_l": _POSITIVE},
    "dpo_sft": {"beta": _POSITIVE, "sft_weight": _NONNEG},
    "gamma_dpo": {"beta": _POSITIVE, "gamma": _NONNEG},
    "hinge": {"beta": _POSITIVE, "gamma": _NONNEG},
    "simpo": {"beta": _POSITIVE, "margin": _NONNEG},
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSS_HPARAMS)


def _range_text(rng: tuple[float, bool, float]) -> str:
    low, inclusive, high = rng
    if high == math.inf:
        return f"{'>=' if inclusive else '>'} {low:g}"
    return f"in [{low:g}, {high:g})"


def validate_loss_hparams(name: Any, hp: Mapping[str, Any]) -> dict[str, float]:
    """Check the hyperparameters of loss ``name``; return them as floats.

    Raises :class:`LossConfigError` for an unknown loss (``key=None``), an unknown, missing,
    non-numeric (bools included) or out-of-range hyperparameter (``key`` = that hyperparameter).
    Hyperparameters have no defaults: every one must be given.
    """
    if not isinstance(name, str) or name not in LOSS_HPARAMS:
        raise LossConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}", key=None)
    if not isinstance(hp, Mapping):
        raise LossConfigError(f"loss '{name}': hyperparameters must be a mapping, got {type(hp).__name__}")
    allowed = LOSS_HPARAMS[name]
    for key in hp:
        if key not in allowed:
            raise LossConfigError(f"unknown hyperparameter {key!r} for loss '{name}' "
                                  f"(expected: {', '.join(allowed)})", key=str(key))
    out: dict[str, float] = {}
    for key, rng in allowed.items():
        if key not in hp:
            raise LossConfigError(f"missing hyperparameter {key!r} for loss '{name}' "
                                  f"(required: {', '.join(allowed)})", key=key)
        value = hp[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LossConfigError(f"hyperparameter {key!r} of loss '{name}' must be a number, "
                                  f"got {value!r} ({type(value).__name__})", key=key)
        value = float(value)
        low, inclusive, high = rng
        ok = math.isfinite(value) and (value >= low if inclusive else value > low) and value < high
        if not ok:
            raise LossConfigError(f"hyperparameter {key!r} of loss '{name}' must be {_range_text(rng)}, "
                                  f"got {value:g}", key=key)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- toy
TOY_REJECTED = 4  # responses 4-7 are the rejected ones (pipeline/analysis/toy.py)


class ScenarioInit(_Strict):
    """The toy's SFT target for one scenario, the same for every prompt ``i``: ``p_chosen`` on response
    ``i``, ``p_rejected`` on EACH of the rejected responses 4–7, the rest spread evenly over the
    other five (the three other prompts' chosen responses and the two unseen ones)."""

    p_chosen: float = Field(gt=0, lt=1)
    p_rejected: float = Field(gt=0, lt=1 / TOY_REJECTED)

    @model_validator(mode="after")
    def _mass_left(self) -> "ScenarioInit":
        rest = 1.0 - self.p_chosen - TOY_REJECTED * self.p_rejected
        if rest <= 0:
            raise ValueError(f"p_chosen + {TOY_REJECTED}·p_rejected must be < 1 (got {1.0 - rest:g})")
        return self


class ToyParams(_Strict):
    """The ``toy:`` section: the toy model of the 3D-properties paper (pipeline/analysis/toy.py)."""

    steps: int = Field(ge=1)  # preference-optimisation steps (full batch, all pairs)
    lr: float = Field(gt=0)
    optimizer: Literal["adam", "sgd"]  # preference step; SFT always uses Adam
    sft_steps: int = Field(ge=1)
    sft_lr: float = Field(gt=0)
    hidden: int = Field(ge=1)
    seeds: tuple[int, ...] = Field(min_length=1)  # each: MLP init + the draw of the rejected responses
    confidence: float = Field(gt=0, lt=1)  # of the t intervals of the changes across seeds
    pairs_per_prompt: int = Field(ge=1)
    losses: tuple[str, ...]
    hparams: dict[str, dict[str, Any]]  # one entry per loss in `losses`, every hyperparameter given
    scenarios: tuple[int, ...]
    scenario_init: dict[int, ScenarioInit]

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in LOSS_HPARAMS:
                raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
        if len(set(v)) != len(v):
            raise ValueError("duplicate entries")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ToyParams":
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
        if len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError("scenarios: duplicate entries")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: duplicate entries")
        return self


# --------------------------------------------------------------------------------------------- flows
def group_of(stage: str) -> str:
    """``train@dpo`` -> ``train`` (a DVC foreach group); other names unchanged."""
    return stage.split("@", 1)[0]


class StageTaskSettings(_Strict):
    """How the Prefect task of one DVC stage is run."""
    retries: int = Field(ge=0)  # extra tries after a failure (each one is `dvc repro -s <stage>` again)
    retry_delay_s: float = Field(ge=0)  # pause between tries
    timeout_s: float = Field(ge=0)  # wall-clock limit of one try, the DVC process group is killed; 0: none


class StageTaskOverride(_Strict):
    """Per-stage (or per foreach group) changes to :class:`StageTaskSettings`; a key left out inherits."""
    retries: int | None = Field(None, ge=0)
    retry_delay_s: float | None = Field(None, ge=0)
    timeout_s: float | None = Field(None, ge=0)


class SweepParams(_Strict):
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


class RoundsParams(_Strict):
    count: int = Field(ge=1)  # rounds of sample -> judge -> pairs -> reference -> train -> evaluate
    variant: str  # the train.variants entry whose trained model starts the next round
    dir: str  # per-round copies of the outputs and the comparison report (git-ignored)
    save_experiments: bool  # also record each round as a DVC experiment <name>-round-<r>


Scenarios = list[int]  # (an alias: ScenariosParams has a field named `list`)


class ScenariosParams(_Strict):
    """``python -m pipeline.flows scenarios``: one DVC experiment per ``pairs.scenario``, one train
    variant, compared side by side in a report."""
    list: Scenarios
    variant: str
    max_parallel: int = Field(ge=1)
    report: str
    timeout_s: float = Field(ge=0)
    retries: int = Field(ge=0)

    @field_validator("list")
    @classmethod
    def _scenarios(cls, v: Scenarios) -> Scenarios:
        if not v:
            raise ValueError("needs at least one scenario (1, 2, 3 or 4)")
        bad = [k for k in v if k not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"unknown scenario(s) {bad}: each must be 1, 2, 3 or 4")
        dup = sorted({k for k in v if v.count(k) > 1})
        if dup:
            raise ValueError(f"scenario(s) {dup} listed more than once")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if not v or not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r} is not a train.variants name")
        return v


class StudyParams(_Strict):
    """``python -m pipeline.flows study``: training seeds x variants x pair sets, one DVC experiment per seed
    and pair set, then ``report`` (a folder) with mean ± sd across seeds, pooled per-pair statistics and
    one row per REFERENCE claim."""
    seeds: list[int] = Field(min_length=1)  # train.seed of each experiment
    sample_seed: bool  # also set sample.seed to the seed (new candidates, hence new pairs, per seed)
    variants: list[str] = Field(min_length=1)  # train.variants entries: evaluate@<v> of each is reproduced
    scenarios: list[int]  # pairs.scenario values (judged pairs), one pair set each; []: the pairs of params.yaml
    overrides: dict[str, Any]  # params set in every experiment (the study's sizes), the `dvc exp run -S` grammar
    max_parallel: int = Field(ge=1)
    report: str
    timeout_s: float = Field(ge=0)
    retries: int = Field(ge=0)

    @field_validator("seeds", "variants", "scenarios")
    @classmethod
    def _unique(cls, v: list) -> list:
        dup = sorted({str(x) for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"{', '.join(dup)} listed more than once")
        return v

    @field_validator("scenarios")
    @classmethod
    def _known_scenarios(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if k not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"unknown scenario(s) {bad}: each must be 1, 2, 3 or 4")
        return v


class FlowParams(_Strict):
    """The ``flows:`` section: how Prefect runs the DVC stages. No stage depends on it."""
    defaults: StageTaskSettings
    stages: dict[str, StageTaskOverride]  # stage name (train@dpo) or foreach group (train) -> overrides
    log_tail_lines: int = Field(ge=1)
    keep_overrides: bool
    remote: str | None
    git_remote: str | None
    report: str
    resources: dict[str, Literal["cpu", "gpu"]]  # stage or foreach group -> resource class (cluster_flow)
    deployments: dict[Literal["cpu", "gpu"], str]  # resource class -> Prefect deployment (cluster_flow)
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

    def resource_of(self, stage: str) -> Literal["cpu", "gpu"]:
        return self.resources.get(stage, self.resources.get(group_of(stage), "cpu"))




class ReportParams(_Strict):
    title: str
    alpha: float = Field(gt=0, lt=1)  # a finding is written only where its test's p-value is below this
    confidence: float = Field(gt=0.5, lt=1)  # level of every interval
    bootstrap_resamples: int = Field(ge=100)
    seed: int  # of the bootstrap
    drastic_drop_orders: float = Field(gt=0)  # the 3D-properties' drastic drop: median change, orders of magnitude


class Params(_Strict):
    prepare: PrepareParams
    policy: PolicyParams
    sample: SampleParams
    sample_other: OtherSampleParams
    vllm: VLLMParams
    judge: JudgeParams
    pairs: PairsParams
    reference: ReferenceParams
    train: TrainParams
    evaluate: EvaluateParams
    report: ReportParams
    toy: ToyParams
    flows: FlowParams
    # Derived from train.variants by parse_params (not a key of params.yaml).
    variants: dict[str, Variant] = Field(default_factory=dict)

    def variant(self, name: str, source: str) -> Variant:
        """The variant a stage's ``--variant`` names; the error names the key and the variants there are."""
        if name not in self.variants:
            raise ConfigError(f"{source}: train.variants.{name}: no such variant (have {sorted(self.variants)})")
        return self.variants[name]


# --------------------------------------------------------------------------------------------- parsing
def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _parse_variant(name: str, raw: Any, common: TrainParams) -> Variant:
    """Accepts ``{loss: dpo, beta: 0.1, lr: ...}`` or ``{loss: [{name: dpo, weight: 1, beta: 0.1}, ...]}``."""
    key = f"train.variants.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping with at least a 'loss' key, got {type(raw).__name__}")
    raw = dict(raw)
    if "loss" not in raw:
        raise ConfigError(f"{key}.loss: missing (name of a loss, or a list of weighted loss terms)")
    loss = raw.pop("loss")
    overrides = {k: raw.pop(k) for k in list(raw) if k in TRAIN_SETTINGS}
    base = common.model_dump(exclude={"variants", "runtime"})
    try:
        settings = TrainSettings(**{**base, **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{key}.{_loc(err['loc'])}: {err['msg']}") from None

    terms: list[LossTerm] = []
    if isinstance(loss, str):
        specs = [(f"{key}", {"name": loss, **raw})]
    elif isinstance(loss, list):
        if raw:
            raise ConfigError(f"{key}.{next(iter(raw))}: unknown key (with a list of loss terms, put "
                              "hyperparameters inside each term)")
        specs = [(f"{key}.loss[{i}]", t) for i, t in enumerate(loss)]
    else:
        raise ConfigError(f"{key}.loss: must be a loss name or a list of terms, got {type(loss).__name__}")
    for where, spec in specs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ConfigError(f"{where}.name: missing loss name")
        spec = dict(spec)
        lname, weight = spec.pop("name"), spec.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.weight: must be a number, got {weight!r}")
        try:
            hp = validate_loss_hparams(lname, spec)
        except LossConfigError as e:
            field = getattr(e, "key", None)
            raise ConfigError(f"{where}{'.' + field if field else ''}: {e}") from None
        terms.append(LossTerm(name=lname, weight=float(weight), hp=hp))
    return Variant(name=name, losses=tuple(terms), settings=settings)


def parse_params(raw: dict[str, Any] | None, source: str = DEFAULT_PARAMS) -> Params:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        params = Params(**{k: v for k, v in raw.items() if k != "variants"})
    except ValidationError as e:
        err = e.errors()[0]
        value = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        raise ConfigError(f"{source}: {_loc(err['loc'])}: {err['msg']}{value}") from None
    try:
        variants = {n: _parse_variant(n, v, params.train) for n, v in params.train.variants.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for name in variants:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{source}: train.variants.{name}: variant names may use letters, digits, - and _")
    _check_reference_matches_training(params, variants, source)
    _check_model(params.policy.model, "policy.model", source)
    _check_model(params.sample_other.model, "sample_other.model", source)
    if params.policy.eval.backend != params.evaluate.generation.backend:
        raise ConfigError(f"{source}: evaluate.generation.backend: {params.evaluate.generation.backend!r} differs "
                          f"from policy.eval.backend {params.policy.eval.backend!r}; accuracy before and after "
                          "training must come from the same decoder")
    if params.pairs.scenario == 3 and params.judge.backend == "llm" and params.judge.llm.mode == "listwise":
        raise ConfigError(f"{source}: pairs.scenario: scenario 3 compares the policy's best with the other "
                          "model's worst across two judged groups, which needs absolute scores: use "
                          "judge.backend rule or judge.llm.mode rubric")
    return params.model_copy(update={"variants": variants})


def _check_reference_matches_training(params: Params, variants: dict[str, Variant], source: str) -> None:
    """The reference log-probs, computed once for all variants, must be truncated and rounded as each
    variant's training computes its own: else ``lp − ref`` is not zero before the first step."""
    ref_len, train = params.reference.max_length, params.train
    if train.max_length != ref_len:
        raise ConfigError(f"{source}: train.max_length: {train.max_length} differs from reference.max_length "
                          f"{ref_len}; the reference and training must truncate the same sequences alike")
    for name, v in variants.items():
        if v.settings.max_length != ref_len:
            raise ConfigError(f"{source}: train.variants.{name}.max_length: {v.settings.max_length} differs from "
                              f"reference.max_length {ref_len} (the reference is computed once for all variants)")
        if v.settings.bf16 != train.bf16:
            raise ConfigError(f"{source}: train.variants.{name}.bf16: {v.settings.bf16} differs from train.bf16 "
                              f"{train.bf16}, the precision of the reference log-probs (computed once for all "
                              "variants)")
        if v.settings.shared_prompt != train.shared_prompt:
            raise ConfigError(f"{source}: train.variants.{name}.shared_prompt: {v.settings.shared_prompt} differs "
                              f"from train.shared_prompt {train.shared_prompt}, the layout of the reference "
                              "log-probs (computed once for all variants)")


def _check_model(spec: str, key: str, source: str) -> None:
    if spec in BUILTIN_MODELS or spec.startswith("hf:"):
        return
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"{source}: {key}: model folder {spec!r} does not exist (use a local folder with "
                          f"config.json, a builtin name {sorted(BUILTIN_MODELS)}, or 'hf:<org>/<name>')")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{source}: {key}: {spec!r} has no config.json, so it is not a model folder")


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw, str(path))


class FlowParamsError(ConfigError):
    """A bad setting under ``flows:`` in params.yaml; the message names the key."""


def parse_flow_params(raw: Any, source: str = DEFAULT_PARAMS) -> FlowParams:
    """The ``flows:`` section alone (the flows read it without validating the stages' sections)."""
    try:
        return FlowParams(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise FlowParamsError(f"{source}: flows.{_loc(err['loc'])}: {err['msg']}") from None
    except TypeError:
        raise FlowParamsError(f"{source}: flows: must be a mapping") from None


def load_flow_params(repo: str | os.PathLike = ".") -> FlowParams:
    path = Path(repo) / DEFAULT_PARAMS
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FlowParamsError(f"{path}: not found") from None
    return parse_flow_params(raw.get("flows") if isinstance(raw, dict) else None, str(path))


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in key by key (nested mappings merged, the rest replaced)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
