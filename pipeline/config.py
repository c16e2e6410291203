"""Typed configuration, parsed once from ``params.yaml``.

Every setting of the pipeline lives in ``params.yaml``; stages call :func:`load_params` and get a
validated :class:`Params`. Any problem (unknown key, wrong type, missing model folder, unknown loss
or loss hyperparameter) raises :class:`ConfigError` whose message names the offending key, e.g.
``params.yaml: train.variants.dpo.beta: Input should be a valid number``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A bad setting in params.yaml; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- prepare
class ReasoningGymSource(_Strict):
    task: str = "chain_sum"
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 1234


class FileSource(_Strict):
    path: str | None = None
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    # gsm8k: {question, answer: "<reasoning> #### <final>"}; math: {problem, solution with \boxed{}}
    preset: Literal["gsm8k", "math"] | None = None
    fields: dict[str, str | None] = Field(default_factory=dict)


class PrepareParams(_Strict):
    source: Literal["reasoning_gym", "file"] = "reasoning_gym"
    reasoning_gym: ReasoningGymSource = ReasoningGymSource()
    file: FileSource = FileSource()
    instruction: str = " Give the final answer as 'Answer: <number>'."
    n_train: int = Field(128, ge=1)
    n_test: int = Field(64, ge=1)
    n_warmup: int = Field(128, ge=0)
    split_seed: int = 0
    on_bad_rows: Literal["error", "quarantine"] = "error"


# --------------------------------------------------------------------------------------------- policy
class GenerationParams(_Strict):
    """Greedy decoding of the test prompts (policy.eval before training, evaluate.generation after)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)  # transformers: sequences per generate call


class WarmupParams(_Strict):
    enabled: bool = True
    epochs: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0


class PolicyParams(_Strict):
    # A builtin name ("smollm2-135m-instruct"), a local model folder, or "hf:<org>/<name>" (network).
    model: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    warmup: WarmupParams = WarmupParams()
    eval: GenerationParams = GenerationParams()


# --------------------------------------------------------------------------------------------- sample
class SampleParams(_Strict):
    backend: Literal["transformers", "vllm"] = "transformers"
    n: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(16, ge=1)  # transformers: sequences per generate call
    seed: int = 0
    # Prompts per saved chunk: a killed stage reruns only the chunks it had not finished.
    chunk_size: int = Field(64, ge=1)
    # Candidates whose sampler log-prob is re-computed by the training code (the difference is reported).
    logprob_check: int = Field(64, ge=0)
    # Finished chunks, outside every DVC output (a relative path is taken from the repository root,
    # also from a `dvc exp` temp workspace); not a DVC param, changing it reruns nothing.
    cache_dir: str = ".cache/samples"


class OtherSampleParams(SampleParams):
    """Candidates of another model: the rejected side of scenarios 3 and 4 (stage sample_other)."""
    # A builtin name, a local model folder or hf:<org>/<name>. Sampled only when pairs.scenario is 3
    # or 4; otherwise the stage writes an empty table.
    model: str = "smollm2-135m-instruct"


class VLLMParams(_Strict):
    """vLLM engines (sample.backend / sample_other.backend / *.eval backend: vllm). How to run, not
    what: not a DVC param of any stage."""
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per engine
    data_parallel_size: int = Field(1, ge=0)  # engines, each on a shard of the prompts; 0: all visible GPUs
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int = Field(1024, ge=16)  # prompt + response tokens per sequence
    max_num_seqs: int = Field(256, ge=1)  # sequences per engine step
    enforce_eager: bool = True  # false: torch.compile (faster on GPUs, slow to start on small CPUs)
    cpu_kvcache_space_gb: float = Field(2.0, gt=0)  # CPU build only (VLLM_CPU_KVCACHE_SPACE)

    def sampler_kwargs(self) -> dict:
        return self.model_dump()


# --------------------------------------------------------------------------------------------- judge
class JudgePrice(_Strict):
    """US dollars per 1,000 tokens; only used for the estimated cost in metrics and the dry run."""
    input_per_1k: float = Field(ge=0)
    output_per_1k: float = Field(ge=0)


class LLMJudgeParams(_Strict):
    """An LLM judge behind any OpenAI-compatible Chat Completions endpoint (see pipeline/judging/llm.py)."""
    # rubric: every candidate scored 1-5 on its own; listwise: the N candidates shown together (in a
    # seeded shuffled order), the judge names the best and the worst.
    mode: Literal["rubric", "listwise"] = "rubric"
    model: str = "gpt-4o-2024-08-06"
    base_url: str | None = None  # None: OpenAI; e.g. http://localhost:8000/v1 for a vLLM server
    # The NAME of the environment variable that holds the key, never the key; null: no key (a local
    # server without auth).
    api_key_env: str | None = "OPENAI_API_KEY"
    show_reference: bool = True  # show the gold final answer to the judge
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(64, ge=1)
    timeout_s: float = Field(60.0, gt=0)  # per HTTP attempt; a timeout is retried by the client
    max_in_flight: int = Field(8, ge=1)  # concurrent requests
    max_retries: int = Field(6, ge=0)  # client retries on 408/409/429/5xx/timeouts (backoff, jitter, Retry-After)
    max_parse_retries: int = Field(2, ge=0)  # extra requests after a malformed answer, then a failure
    # A group with a failed candidate: drop_group (status failed) or ignore_failed (judge the group on
    # the candidates that got a score; failed if fewer than 2). Listwise failures fail the whole group.
    on_failure: Literal["drop_group", "ignore_failed"] = "drop_group"
    # Abort (no outputs, answers kept in the cache) when more than this share of requests failed.
    max_failed_fraction: float = Field(0.2, ge=0, le=1)
    seed: int = 0  # shuffle of the candidate order shown to the judge (listwise)
    structured_output: bool = True  # ask for a JSON schema; falls back to plain text if the server refuses
    prices: dict[str, JudgePrice] = Field(default_factory=dict)  # model -> price
    # Answer cache, outside every DVC output so that `dvc repro` never deletes it. A relative path is
    # taken from the repository root (also from a `dvc exp run --temp`/queue workspace under
    # .dvc/tmp/exps, which is resolved back to the main repository); the environment variable
    # DPO_JUDGE_CACHE, or an absolute path here, overrides it.
    cache_dir: str = ".cache/judge"
    dry_run: bool = False  # print the number of requests and estimated tokens, send nothing

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
    backend: Literal["rule", "llm"] = "rule"
    # Minimum score gap between best and worst; groups below it count as ties and are dropped.
    min_gap: float = Field(1e-9, gt=0)
    llm: LLMJudgeParams = LLMJudgeParams()


# --------------------------------------------------------------------------------------------- pairs
class PairsParams(_Strict):
    scenario: Literal[1, 2, 3, 4] = 1
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    # Edges of the normalised-edit-distance buckets used by evaluate and the report.
    distance_buckets: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])

    @field_validator("distance_buckets")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        if sorted(v) != v or any(not 0 < x < 1 for x in v):
            raise ValueError("must be increasing values strictly between 0 and 1")
        return v


class ReferenceParams(_Strict):
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(256, ge=8)


# --------------------------------------------------------------------------------------------- train


class LossTerm(_Strict):
    name: str
    weight: float = 1.0
    hp: dict[str, float] = Field(default_factory=dict)


class TrainSettings(_Strict):
    lr: float = Field(1e-5, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)  # global batch in pairs, independent of processes
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(256, ge=8)
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(10.0, gt=0)
    bf16: bool = True  # bf16 autocast on GPU; ignored on CPU
    probe_every: int = Field(4, ge=0)  # re-score the greedy decode of the probe prompts every K steps (0: off)
    probe_prompts: int = Field(8, ge=1)


class RuntimeParams(_Strict):
    """How to run, not what to compute: not a DVC param of the train stage, so changing it reruns nothing."""

    nproc: int = Field(1, ge=1)  # processes; > 1 relaunches the stage under torchrun
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard, for models that do not fit one GPU
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints (0: none); a rerun resumes
    checkpoint_dir: str = ".cache/checkpoints"


TRAIN_SETTINGS = tuple(TrainSettings.model_fields)


class Variant(_Strict):
    name: str
    losses: tuple[LossTerm, ...]
    settings: TrainSettings


class TrainParams(TrainSettings):
    """Settings shared by all variants (a variant may override any), the runtime, and the variants."""

    runtime: RuntimeParams = RuntimeParams()
    variants: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------- rest
class EvaluateParams(_Strict):
    generation: GenerationParams = GenerationParams()
    batch_size: int = Field(16, ge=1)
    # Also score the greedy answers 1-5 with the LLM judge of judge.llm ("5 points", "4 & 5 points").
    llm_rubric: bool = False


from pipeline.flows.dvc_runner import FlowParams  # noqa: E402  (Prefect flows; no Prefect import)
from pipeline.analysis.toy import ToyParams  # noqa: E402  (the toy stage's own section)


class ReportParams(_Strict):
    title: str = "DPO-family report"


class Params(_Strict):
    prepare: PrepareParams = PrepareParams()
    policy: PolicyParams = PolicyParams()
    sample: SampleParams = SampleParams()
    sample_other: OtherSampleParams = OtherSampleParams()
    vllm: VLLMParams = VLLMParams()
    judge: JudgeParams = JudgeParams()
    pairs: PairsParams = PairsParams()
    reference: ReferenceParams = ReferenceParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    toy: ToyParams = ToyParams()
    flows: FlowParams = FlowParams()
    variants: dict[str, Variant] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------- parsing
def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _parse_variant(name: str, raw: Any, common: TrainParams) -> Variant:
    """Accepts ``{loss: dpo, beta: 0.1, lr: ...}`` or ``{loss: [{name: dpo, weight: 1, beta: 0.1}, ...]}``."""
    from pipeline.training import losses as loss_registry  # local import: losses imports torch

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
            hp = loss_registry.validate_hparams(lname, spec)
        except loss_registry.LossConfigError as e:
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


def _check_model(spec: str, key: str, source: str) -> None:
    from pipeline.model.loading import BUILTIN_MODELS

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
