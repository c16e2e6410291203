"""The GPU checks that train (:mod:`pipeline.bench.gpu_check`): the bf16 reference check and the timed train
step (tokens/s, MFU and peak GPU memory), on any policy the checks load (:mod:`pipeline.bench.gpu_policy`).

MFU = 6 · N · tokens/s over the GPU's measured bf16 peak, N the base model's parameters and tokens the
pairs' prompt + chosen + rejected tokens (the prompt runs once per pair in the one-row-per-pair layout):
the model FLOPs of a full fine-tune, whatever checkpointing recomputes. A LoRA step computes no gradient of
the base's weights, about 4 · N FLOPs a token, so its ``mfu_4n`` is its utilisation; its ``mfu`` (6 · N)
compares it with a full fine-tune's at equal tokens/s.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.bench.gpu_policy import PolicySpec, check_settings, examples_with_reference, load_policy, synth_pairs
from pipeline.settings.train import TrainSettings, Variant

# The settings of the larger policy's train step: (train.gradient_checkpointing, a LoRA adapter)
LARGE_SETTINGS = {"full": (False, False), "ckpt": (True, False), "lora": (False, True), "lora_ckpt": (True, True)}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class StepSizes:
    batch: int  # pairs per step
    steps: int  # timed steps, after one warm-up
    prompt_len: int
    response_len: int
    max_length: int


def reference_check(policy: PolicySpec, variant: Variant) -> dict:
    """The reference stage's log-probs (``pair_logprobs`` at ``train.bf16``) against the trainer's first-step
    log-probs of the same pairs, where the policy is the reference: the first-step check's ``ref_gap_per_token``
    must be within ``train.ref_check_tol``. The gaps of an fp32 reference are recorded beside it."""
    from pipeline.training.trainer import RunOptions, train_preference

    model, pad_id, source = load_policy(policy)
    settings = check_settings(variant.settings, batch_size=8, epochs=1, lr=1e-12)
    pairs = synth_pairs(8, 94, 17, model.config.vocab_size, seed=1)  # the default pairs' lengths
    out = {
        "model_source": source,
        "ref_check_tol": settings.ref_check_tol,
        "bf16": settings.bf16,
        "device": str(next(model.parameters()).device),
    }
    # both references from the starting policy, each computed once
    refs = {
        bf16: examples_with_reference(model.eval(), pairs, pad_id, settings, bf16) for bf16 in {settings.bf16, False}
    }
    for i, (name, bf16) in enumerate((("same_precision", settings.bf16), ("fp32_reference", False))):
        if i:
            del model
            model, pad_id, _ = load_policy(policy)  # a fresh policy: the first run stepped this one
        seen: dict[int, dict[str, float]] = {}
        try:
            train_preference(
                model, refs[bf16], variant.losses, settings, pad_id=pad_id, run=RunOptions(log_fn=seen.setdefault)
            )
            gaps = ("ref_gap_per_token", "ref_gap_max", "ref_gap_mean")
            out[name] = {**{k: seen[0][k] for k in gaps}, "failed": None}
        except ValueError as e:  # the trainer's first-step check refused it
            out[name] = {"failed": str(e)[:400]}
    out["reference_bf16_vs_fp32_max_abs"] = max(
        max(abs(x.ref_w - y.ref_w), abs(x.ref_l - y.ref_l)) for x, y in zip(refs[settings.bf16], refs[False])
    )
    same = out["same_precision"]
    out["passed"] = same.get("failed") is None and same["ref_gap_per_token"] <= settings.ref_check_tol
    return out


def _timed_tokens(pairs: list[dict], sizes: StepSizes, seed: int) -> int:
    """Prompt + chosen + rejected tokens of the timed steps' pairs (every step after the first)."""
    from pipeline.training.batching import step_batches

    order = [i for b in step_batches(len(pairs), sizes.batch, 1, seed) for i in b]
    tokens = 0
    for i in order[sizes.batch :]:
        lengths = [len(pairs[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
        if lengths[0] + max(lengths[1:]) > sizes.max_length:  # truncated: the count would overstate the work
            raise ValueError(
                f"a pair of {lengths[0]} + {max(lengths[1:])} tokens exceeds max_length {sizes.max_length}"
            )
        tokens += sum(lengths)
    return tokens


@dataclass
class TrainedSteps:
    """What :func:`train_steps` ran: the trained model, where its weights came from, its settings, the pairs
    and the wall-clock stamp after each step (stamp 0: the warm-up's end)."""

    model: torch.nn.Module
    source: str
    n_params: int  # the base's, before any adapter
    n_embed: int
    settings: TrainSettings
    pairs: list[dict]
    stamps: list[float]


def train_steps(
    policy: PolicySpec, variant: Variant, sizes: StepSizes, on_step: Callable[[int], None] | None = None, **overrides
) -> TrainedSteps:
    """:func:`train_preference` of a freshly loaded ``policy`` at params' precision and layout for one warm-up
    step and ``sizes.steps`` more, on random pairs (``overrides``: other train settings, such as
    ``gradient_checkpointing`` or ``lora``, with a LoRA adapter attached as the train stage attaches it).
    ``on_step(step)`` runs after each step's stamp, the device synchronised."""
    from pipeline.training import lora
    from pipeline.training.trainer import RunOptions, train_preference

    model, pad_id, source = load_policy(policy)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    # random pairs: their reference is meaningless, so the first-step check is set out of the way
    settings = check_settings(
        variant.settings, batch_size=sizes.batch, epochs=1, max_length=sizes.max_length, ref_check_tol=1e9, **overrides
    )
    model = lora.attach(model, settings.lora, settings.seed)
    pairs = synth_pairs(
        sizes.batch * (sizes.steps + 1), sizes.prompt_len, sizes.response_len, model.config.vocab_size, seed=2
    )
    stamps: list[float] = []

    def log_fn(step, metrics):
        sync()
        stamps.append(time.perf_counter())
        if on_step is not None:
            on_step(step)

    examples = examples_with_reference(model, pairs, pad_id, settings, None)
    train_preference(model, examples, variant.losses, settings, pad_id=pad_id, run=RunOptions(log_fn=log_fn))
    return TrainedSteps(model, source, n_params, n_embed, settings, pairs, stamps)


def timed_train(policy: PolicySpec, variant: Variant, sizes: StepSizes, peak_tflops: float | None, **overrides) -> dict:
    """:func:`train_steps` timed over the steps after the warm-up: tokens/s, MFU where the peak is known, and
    the peak GPU memory (``torch.cuda.max_memory_allocated``, weights included) on a GPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = train_steps(policy, variant, sizes, **overrides)
    settings, n_params, n_embed = run.settings, run.n_params, run.n_embed
    tokens = _timed_tokens(run.pairs, sizes, settings.seed)
    seconds = run.stamps[sizes.steps] - run.stamps[0]
    tokens_per_s = tokens / seconds
    out = {
        "model_source": run.source,
        "batch_pairs": sizes.batch,
        "timed_steps": sizes.steps,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens_per_s,
        "n_params": n_params,
        "n_params_non_embedding": n_params - n_embed,
        "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        "gradient_checkpointing": settings.gradient_checkpointing,
        "bf16": settings.bf16,
        "device": str(next(run.model.parameters()).device),
    }
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if peak_tflops:
        out["mfu"] = 6 * n_params * tokens_per_s / (peak_tflops * 1e12)
        out["mfu_non_embedding"] = 6 * (n_params - n_embed) * tokens_per_s / (peak_tflops * 1e12)
        if settings.lora.r:
            out["mfu_4n"] = 4 * n_params * tokens_per_s / (peak_tflops * 1e12)
    return out


def large_train(policy: PolicySpec, variant: Variant, sizes: StepSizes, peak_tflops: float | None, lora_r: int) -> dict:
    """:func:`timed_train` of ``policy`` at each of :data:`LARGE_SETTINGS` (a full fine-tune, checkpointing,
    a LoRA adapter of rank ``lora_r``, both), each on a freshly loaded policy; one that fails (out of GPU
    memory) records why and the others still run."""
    out: dict = {}
    for name, (checkpointing, adapter) in LARGE_SETTINGS.items():
        lora = variant.settings.lora.model_copy(update={"r": lora_r if adapter else 0})
        try:
            out[name] = timed_train(
                policy, variant, sizes, peak_tflops, gradient_checkpointing=checkpointing, lora=lora
            )
        except Exception:  # noqa: BLE001 - torch.cuda.OutOfMemoryError above all: record it, run the next
            out[name] = {"failed": traceback.format_exc()[-2000:]}
        gc.collect()
    return out
