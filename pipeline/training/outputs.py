"""What the train stage writes: the run's dvclive log, the trained policy's folder with its model
card, and the curves tables.

Under torchrun every rank trains; rank 0 writes (the other ranks only take part in gathering the
trained weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline import paths
from pipeline.io import atomic_dir, write_table
from pipeline.model import card as model_card
from pipeline.model import loading
from pipeline.schema import schema_of
from pipeline.training import distributed
from pipeline.training import lora as lora_adapter
from pipeline.training.curves import Curves

if TYPE_CHECKING:
    from pipeline.settings.train import LoraParams, Variant
    from pipeline.training.trainer import LogFn


class LiveLog:
    """The run's metrics in dvclive, step by step (curves in ``dvc plots``), from rank 0 only."""

    def __init__(self, variant: Variant, n_pairs: int, ctx: distributed.Context):
        from dvclive import Live

        self.live = (
            Live(dir=paths.live_dir(variant.name), dvcyaml=None, save_dvc_exp=False, report=None)
            if ctx.is_main
            else None
        )
        if self.live is not None:
            self.live.log_params(
                {
                    "variant": variant.name,
                    "losses": [t.model_dump() for t in variant.losses],
                    **variant.settings.model_dump(),
                    "n_pairs": n_pairs,
                    "world_size": ctx.world,
                }
            )

    @property
    def log_fn(self) -> LogFn | None:
        """The trainer's callback: one dvclive step per call (None on the other ranks)."""
        return self._log_step if self.live is not None else None

    def _log_step(self, step: int, metrics: dict[str, float]) -> None:
        live = self.live
        assert live is not None  # log_fn hands this out on rank 0 only
        for k, v in metrics.items():
            live.log_metric(k, v)
        live.next_step()

    def end(self, summary: dict[str, Any]) -> None:
        """Add ``summary`` to the metrics file and close the log (rank 0; the other ranks have none)."""
        if self.live is not None:
            self.live.summary.update(summary)
            self.live.end()


def gathered_policy(model, ctx: distributed.Context, base_dir: str, dtype: str, lora: LoraParams):
    """The trained weights in a plain model on the CPU on rank 0 (with its adapter when ``lora.r``), None on
    the other ranks.

    Every rank takes part in gathering the weights that trained (a LoRA run: the adapter alone). FSDP2's
    sharded model cannot load them, nor can a 4-bit base be saved as it is, so there a fresh copy of the
    base model in ``base_dir`` takes them (:func:`pipeline.training.lora.fresh_policy`)."""
    state = distributed.full_state_dict(model, ctx, trainable_only=True)
    if not ctx.is_main:
        return None
    fresh = (ctx.strategy == "fsdp" and ctx.distributed) or lora.load_in_4bit
    plain = lora_adapter.fresh_policy(base_dir, dtype, ctx.device, lora) if fresh else distributed.unwrap(model)
    distributed.load_model_state(plain, state)
    return plain.to("cpu")


@dataclass(frozen=True)
class TrainedRun:
    """What the trained policy's folder records of its training."""

    variant: Variant
    base_model: str  # the starting policy's spec (``policy.model``)
    base_dir: str  # its folder
    data: dict  # :func:`pipeline.model.card.data_fingerprint` of the training data
    history: list[dict[str, float]]
    world_size: int
    ref_check: dict  # :func:`pipeline.training.trainer.first_step_check`


def save_policy(policy, tokenizer, run: TrainedRun, out_dir: str) -> None:
    """The policy's folder, with ``pipeline.json`` and the Hub's model card (README.md): what a reader of
    the folder needs to know it was trained on. The export stage completes the card with the evaluation.
    A LoRA run's folder holds the adapter (``adapter/``) and the model with it merged, in one rename."""
    v = run.variant
    base_fingerprint = loading.fingerprint(run.base_dir)
    adapter = lora_adapter.record(policy, v.settings.lora)
    extra = {
        "variant": v.name,
        "losses": [t.model_dump() for t in v.losses],
        "settings": v.settings.model_dump(),
        "steps": len(run.history),
        "world_size": run.world_size,
        "base_fingerprint": base_fingerprint,
    }
    with atomic_dir(out_dir) as tmp:
        if lora_adapter.is_adapter(policy):
            policy = lora_adapter.save_and_merge(policy, tmp)
        loading.write_model(policy, tokenizer, tmp, extra)
    card = model_card.training_card(
        variant=v.name,
        base_model=run.base_model,
        base_fingerprint=base_fingerprint,
        losses=[model_card.loss_record(t.name, t.weight, t.hp) for t in v.losses],
        hyperparameters=v.settings.model_dump(),
        data=run.data,
        training={
            "steps": len(run.history),
            "world_size": run.world_size,
            "last_step": run.history[-1],
            "ref_check": run.ref_check,
        },
        adapter=adapter,
    )
    model_card.save(card, Path(out_dir) / model_card.CARD_FILE)


def write_curves(curves: Curves, variant: str) -> None:
    """The tables ``fixed_curves`` and ``probe_curves``, in one folder (one DVC output)."""
    with atomic_dir(paths.train_dir(variant)) as tmp:
        write_table(
            pl.DataFrame(curves.fixed, schema=schema_of("fixed_curves")),
            tmp / Path(paths.fixed_curves(variant)).name,
            "fixed_curves",
        )
        write_table(
            pl.DataFrame(curves.probe, schema=schema_of("probe_curves")),
            tmp / Path(paths.probe_curves(variant)).name,
            "probe_curves",
        )
