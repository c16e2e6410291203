"""Activation checkpointing of the policy's decoder layers (``train.gradient_checkpointing``).

Each decoder layer's forward keeps only its input; the backward runs the layer's forward again to rebuild
the activations its gradient needs. Non-reentrant ``torch.utils.checkpoint``: it takes the keyword
arguments the layers get (the one-row-per-pair layout's 4D attention mask and position ids), lets DDP's
gradient hooks fire once per parameter, and restores the forward's autocast and RNG state for the replay.

It goes through transformers' ``gradient_checkpointing_enable`` rather than torch's ``checkpoint_wrapper``
because that composes with FSDP2 as it is: the layer's whole ``__call__``, FSDP2's hooks included, runs
inside the checkpoint; in the replay FSDP2's pre-forward hook finds the layer in its pre-backward state, where
the pre-backward hook has already all-gathered the parameters, and does nothing. ``checkpoint_wrapper`` would
put a wrapper module around each layer, which renames every parameter beneath it, and replay the layer with
the KV-cache the model's forward hands it, filling it twice; transformers' layers drop the cache under
checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from pipeline.model import precision

if TYPE_CHECKING:
    from pipeline.settings.train import TrainSettings


def apply(model, settings: TrainSettings, device) -> None:
    """With ``settings.gradient_checkpointing``, checkpoint every decoder layer of ``model`` on ``device``,
    replayed at training's precision and attention kernel (:func:`pipeline.model.precision.autocast` with
    ``settings.bf16`` and ``settings.cpu_attention``); without it, or when the model's layers are checkpointed
    already (sharded at load), nothing. FSDP2 must shard the layers after this, as they will run."""
    if settings.gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False):
        enable(model, lambda: precision.autocast(device, settings.bf16, settings.cpu_attention))


def enable(model, recompute_context: Callable[[], AbstractContextManager]) -> None:
    """Checkpoint every decoder layer of ``model`` (a transformers model), the replay in the backward run
    under ``recompute_context()``.

    The replay must compute exactly what the forward did, and the backward runs outside the context the
    forward ran in: :func:`pipeline.model.precision.autocast` also selects the CPU's attention kernel,
    which the checkpoint does not restore, so a replay without it takes another kernel and differs."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing; "
            "set it to false"
        )

    def contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
        return contextlib.nullcontext(), recompute_context()

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": contexts})
