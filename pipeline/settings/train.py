"""The ``train:`` and ``reference:`` sections: settings shared by the variants, the runtime, the variants
with their loss terms, and the reference log-probs that every variant's training is checked against."""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from typing_extensions import Self

from pipeline.settings.base import ConfigError, StageParams, Strict, error_text, merged
from pipeline.training.loss_hparams import LossConfigError, validate_loss_hparams


class ReferenceParams(Strict):
    batch_size: int = Field(ge=1)
    max_length: int = Field(ge=8)  # must equal train.max_length (checked): both truncate alike


class LossTerm(Strict):
    name: str
    weight: float
    hp: dict[str, float]


class LoraParams(Strict):
    """LoRA through peft: the base weights stay frozen and an adapter ``B A`` of rank ``r`` trains beside
    each targeted linear layer; ``r`` 0 trains every weight instead (a full fine-tune)."""

    r: int = Field(ge=0)
    alpha: int = Field(gt=0)  # the adapter's product is scaled by alpha / r (an integer, as peft takes it)
    dropout: float = Field(ge=0, lt=1)  # on the adapter's input only
    # The layers that get an adapter, by peft's names (q_proj, ...); all-linear: every linear layer but the head
    target_modules: Literal["all-linear"] | list[str]
    # QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only), the adapter in policy.dtype. The
    # reference stage scores the same 4-bit base, so a variant may not change it.
    load_in_4bit: bool

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> Any:
        if value == "all-linear" or (isinstance(value, list) and value and all(isinstance(m, str) for m in value)):
            return value
        raise ValueError(f"all-linear or a non-empty list of module names (q_proj, ...), got {value!r}")

    @model_validator(mode="after")
    def _quantised_base_needs_an_adapter(self) -> Self:
        if self.load_in_4bit and not self.r:
            raise ValueError("load_in_4bit needs r > 0: 4-bit weights do not train, only an adapter beside them")
        return self


class TrainSettings(Strict):
    """What one variant trains with: the shared settings after the variant's overrides."""

    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # global batch in pairs, independent of processes
    grad_accum: int = Field(ge=1)
    max_length: int = Field(ge=8)  # must equal reference.max_length, in every variant (checked)
    seed: int
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    # bf16 autocast on GPUs and CPUs with native bf16 (else fp32), for training, the reference and
    # evaluation's log-probs alike; a variant may not change it (the reference is computed once).
    bf16: bool
    # One row per pair, prompt + chosen + rejected, the rejected masked from the chosen (the prompt is run
    # once); false: each response after its own copy of the prompt. Training, the reference and evaluation
    # alike; a variant may not change it (the reference is computed once for all variants).
    shared_prompt: bool
    # The attention kernel under bf16 on a CPU (GPUs run their fused kernels either way). math: a
    # sequence's log-probs stay the same in most batches, so the first step scores pairs as the reference
    # stage did; flash: faster and lighter, log-probs moved by rounding with the batch. Training, the
    # reference and evaluation alike; a variant may not change it.
    cpu_attention: Literal["math", "flash"]
    # |lp − ref| per response token (nats, summed over the first step's sequences) allowed on the first step
    # of a fresh run, where the policy is the reference; above it training fails (the reference was computed
    # differently).
    ref_check_tol: float = Field(gt=0)
    # drop: each epoch's short last batch is dropped, so every step sees batch_size pairs; keep: trained
    tail: Literal["drop", "keep"]
    # Fixed sets (all held-out pairs and eval_train_pairs training pairs) scored at step 0, every K steps
    # and after the last step (0: off); the probe prompts' greedy decode every probe_every steps likewise.
    eval_every: int = Field(ge=0)
    eval_train_pairs: int = Field(ge=0)
    probe_every: int = Field(ge=0)
    probe_prompts: int = Field(ge=1)
    # Activation checkpointing of every decoder layer: the forward keeps only each layer's input and the
    # backward runs each layer's forward again to rebuild the rest. The same loss and gradients either way;
    # a variant may change it.
    gradient_checkpointing: bool
    lora: LoraParams  # r > 0: a LoRA adapter trains and is merged into the saved model; 0: every weight trains


TRAIN_SETTINGS = tuple(TrainSettings.model_fields)
# The reference log-probs are computed once for all variants, so these must be the same in each.
SHARED_WITH_REFERENCE = ("max_length", "bf16", "shared_prompt", "cpu_attention", "lora.load_in_4bit")


class RuntimeParams(Strict):
    """How to run, not what to compute: not a DVC param of the train stage, so changing it reruns nothing."""

    nproc: int = Field(ge=1)  # processes; > 1 relaunches the stage under torchrun
    backend: Literal["auto", "nccl", "gloo"]  # auto: nccl on GPUs, gloo on CPU
    strategy: Literal["ddp", "fsdp"]  # fsdp: FSDP2 fully_shard, for models that do not fit one GPU
    # FSDP2 keeps the sharded parameters, gradients and optimiser state in CPU memory (strategy fsdp only)
    offload: bool
    # Training on a CPU re-executes on this allocator (pipeline.training.allocator): tcmalloc returns what a
    # step frees; system: glibc's malloc, which keeps much of it resident
    cpu_allocator: Literal["tcmalloc", "system"]
    checkpoint_every: int = Field(ge=0)  # steps between checkpoints (0: none); a rerun resumes
    checkpoint_dir: str
    # Machines of one run; > 1: torchrun's c10d rendezvous at rdzv_endpoint (host:port of the machine that runs
    # the stage, the leader) under rdzv_id, which the others join (pipeline.training.follow) within
    # rdzv_timeout seconds. nproc, nnodes, rdzv_endpoint and rdzv_id may be set per machine by environment
    # variables (pipeline.training.multinode.ENV).
    nnodes: int = Field(ge=1)
    rdzv_endpoint: str = Field(pattern=r"^[^\s:]+:\d+$")
    rdzv_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    rdzv_timeout: int = Field(ge=1)

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> Self:
        if self.offload and self.strategy != "fsdp":
            raise ConfigError(
                f"train.runtime.offload: true needs train.runtime.strategy: fsdp (got {self.strategy}); only "
                "FSDP2 shards the model and can keep its shards in CPU memory"
            )
        return self


class Variant(Strict):
    name: str
    losses: tuple[LossTerm, ...]
    settings: TrainSettings


def _plain(value: Any) -> Any:
    """A validated section (``lora``) as the mapping it came from, for a variant's keys to merge into."""
    return value.model_dump() if isinstance(value, Strict) else value


def _loss_specs(key: str, loss: Any, rest: dict[str, Any]) -> list[tuple[str, Any]]:
    """(where, term spec) of a variant's ``loss``: one name with its hyperparameters beside it, or a list."""
    if isinstance(loss, str):
        return [(key, {"name": loss, **rest})]
    if isinstance(loss, list):
        if rest:
            raise ConfigError(
                f"{key}.{next(iter(rest))}: unknown key (with a list of loss terms, put "
                "hyperparameters inside each term)"
            )
        return [(f"{key}.loss[{i}]", t) for i, t in enumerate(loss)]
    raise ConfigError(f"{key}.loss: must be a loss name or a list of terms, got {type(loss).__name__}")


def _loss_term(where: str, spec: Any) -> LossTerm:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}.name: missing loss name")
    spec = dict(spec)
    name, weight = spec.pop("name"), spec.pop("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise ConfigError(f"{where}.weight: must be a number, got {weight!r}")
    try:
        hp = validate_loss_hparams(name, spec)
    except LossConfigError as e:
        raise ConfigError(f"{where}{'.' + e.key if e.key else ''}: {e}") from None
    return LossTerm(name=name, weight=float(weight), hp=hp)


def parse_variant(name: str, raw: Any, common: dict[str, Any]) -> Variant:
    """A variant from ``{loss: dpo, beta: 0.1, lr: ...}`` or ``{loss: [{name: dpo, weight: 1, beta: 0.1}, ...]}``:
    its loss terms, and ``common`` (the shared settings) with its overrides."""
    key = f"train.variants.{name}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{key}: variant names may use letters, digits, - and _")
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: must be a mapping with at least a 'loss' key, got {type(raw).__name__}")
    if "loss" not in raw:
        raise ConfigError(f"{key}.loss: missing (name of a loss, or a list of weighted loss terms)")
    rest = {k: v for k, v in raw.items() if k != "loss" and k not in TRAIN_SETTINGS}
    overrides = {k: v for k, v in raw.items() if k in TRAIN_SETTINGS}
    try:
        settings = TrainSettings(**merged(common, overrides))  # lora: the variant's keys over the shared ones
    except ValidationError as e:
        raise ConfigError(error_text(e.errors()[0], key)) from None
    terms = tuple(_loss_term(where, spec) for where, spec in _loss_specs(key, raw["loss"], rest))
    return Variant(name=name, losses=terms, settings=settings)


class TrainParams(TrainSettings):
    """Settings shared by all variants (a variant may override any but those in
    :data:`SHARED_WITH_REFERENCE`), the runtime, and the variants, parsed into :class:`Variant`."""

    runtime: RuntimeParams
    variants: dict[str, Variant]

    @field_validator("variants", mode="before")
    @classmethod
    def _parse_variants(cls, raw: Any, info: ValidationInfo) -> Any:
        common = {k: _plain(info.data[k]) for k in TRAIN_SETTINGS if k in info.data}
        if len(common) < len(TRAIN_SETTINGS) or not isinstance(raw, dict):
            return raw  # a shared setting failed (reported first), or not a mapping (pydantic says so)
        return {name: parse_variant(name, spec, common) for name, spec in raw.items()}

    @model_validator(mode="after")
    def _variants_share_the_reference(self) -> Self:
        for name, variant in self.variants.items():
            for key in SHARED_WITH_REFERENCE:
                mine, shared = attrgetter(key)(variant.settings), attrgetter(key)(self)
                if mine != shared:
                    raise ConfigError(
                        f"train.variants.{name}.{key}: {mine} differs from train.{key} {shared}: the "
                        "reference log-probs are computed once for all variants at the shared setting"
                    )
        return self

    @model_validator(mode="after")
    def _quantised_base_is_not_sharded(self) -> Self:
        if self.lora.load_in_4bit and self.runtime.nproc > 1 and self.runtime.strategy == "fsdp":
            raise ConfigError(
                "train.lora.load_in_4bit: a 4-bit base is not sharded with FSDP2 here; use "
                "train.runtime.strategy: ddp (each process holds the 4-bit base) or load_in_4bit: false"
            )
        return self

    def variant(self, name: str) -> Variant:
        """The variant a stage's ``--variant`` names; the error names the key and the variants there are."""
        if name not in self.variants:
            raise ConfigError(f"train.variants.{name}: no such variant (have {sorted(self.variants)})")
        return self.variants[name]


class Training(StageParams):
    """A view holding the ``train:`` section, whose variants a stage's ``--variant`` names."""

    train: TrainParams

    def variant(self, name: str) -> Variant:
        try:
            return self.train.variant(name)
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None


class ReferenceAndTraining(Training):
    """The reference log-probs and the training checked against them: truncated alike."""

    reference: ReferenceParams

    @model_validator(mode="after")
    def _same_truncation(self) -> Self:
        if self.train.max_length != self.reference.max_length:
            raise ConfigError(
                f"train.max_length: {self.train.max_length} differs from reference.max_length "
                f"{self.reference.max_length}; the reference and training must truncate the same "
                "sequences alike"
            )
        return self
