"""The policy loaded for training, sharded as it loads under FSDP2, so that no GPU ever holds it whole.

Under ``train.runtime.strategy: fsdp`` on several processes every rank builds the model on the meta device
(shapes, no memory), checkpoints its layers and shards it (:func:`pipeline.training.distributed.shard`,
with the offload and mixed-precision policies), then allocates only its own shards. Rank 0 alone reads
the checkpoint, into CPU memory, and ``set_model_state_dict(broadcast_from_rank0=True)`` sends it one
tensor at a time: each rank keeps its slice of a tensor and drops the rest before the next one comes.
A 70B policy on 8 GPUs thus needs its weights once in rank 0's CPU memory, and on each GPU an eighth of
them plus the one tensor in transit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.model import loading, quantised
from pipeline.training import activation_checkpointing, distributed, lora

if TYPE_CHECKING:
    from pipeline.settings.train import TrainSettings


def load_for_training(path: str | os.PathLike, dtype: str, ctx: distributed.Context, settings: TrainSettings):
    """(model, tokenizer) of the model folder ``path`` for training, with a fresh LoRA adapter when
    ``settings.lora.r`` (:func:`pipeline.training.lora.attach`): sharded by :func:`load_sharded` under FSDP2 on
    several processes, else the whole model in ``dtype`` (or 4 bits: ``lora.load_in_4bit``) on ``ctx.device``."""
    tokenizer = loading.load_tokenizer(path)
    if not (ctx.distributed and ctx.strategy == "fsdp"):
        base = quantised.load_base(path, dtype, ctx.device, settings.lora)
        return lora.attach(base, settings.lora, settings.seed), tokenizer
    return load_sharded(path, dtype, ctx, settings), tokenizer


def load_sharded(path: str | os.PathLike, dtype: str, ctx: distributed.Context, settings: TrainSettings):
    """The model of folder ``path`` in ``dtype``, checkpointed by ``settings`` and sharded over ``ctx``'s
    ranks, every shard filled from rank 0's copy of the weights (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))
    if (Path(path) / "generation_config.json").is_file():  # from_config derives one from the config alone
        base.generation_config = GenerationConfig.from_pretrained(path)
    # A LoRA adapter goes in before sharding, so FSDP2 shards and reduces its weights with the layers' own;
    # rank 0's copy, with the same seeded adapter, fills them.
    model = lora.attach(base, settings.lora, settings.seed)
    activation_checkpointing.apply(model, settings, ctx.device)
    distributed.shard(model, ctx, bf16=settings.bf16)
    # Offloaded shards live in CPU memory; FSDP2 copies each to the GPU when its layer runs.
    model.to_empty(device="cpu" if ctx.offload else ctx.device)
    full = lora.attach(loading.load_model(path, dtype), settings.lora, settings.seed) if ctx.is_main else None
    set_model_state_dict(
        model,
        full.state_dict() if full is not None else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    _buffers_from_rank0(model, full, ctx)
    return model


def _buffers_from_rank0(model, full, ctx: distributed.Context) -> None:
    """Every buffer of ``model`` from rank 0's ``full`` copy, on the compute device. FSDP2 shards parameters
    only, and ``to_empty`` left the buffers uninitialised: the state dict lacks the non-persistent ones
    (rotary inverse frequencies), and under offload the rest sit in CPU memory beside the shards."""
    source = dict(full.named_buffers()) if full is not None else {}
    for prefix, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            key = f"{prefix}.{name}" if prefix else name
            value = source[key].to(ctx.device) if ctx.is_main else torch.empty_like(buf, device=ctx.device)
            dist.broadcast(value, src=0)
            setattr(module, name, value)
