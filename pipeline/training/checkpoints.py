"""Checkpoints of a training run: where and how often, and saving and resuming the trainer's state.

A checkpoint holds the weights that train (all of them, or a LoRA run's adapter alone), the optimiser and
its schedule, each process's random state (a LoRA adapter's dropout draws from it), the history and the
curves after some steps; a rerun of the same run (same settings and inputs) resumes from it, another run
ignores it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.training import distributed
from pipeline.training.curves import Curves

if TYPE_CHECKING:
    from pipeline.settings.train import RuntimeParams, Variant
    from pipeline.training.trainer import PreferenceTrainer

log = logging.getLogger("pipeline.training.checkpoints")


@dataclass(frozen=True)
class Checkpointing:
    """Where and how often to checkpoint; ``key`` ties a checkpoint to the run that wrote it."""

    path: str
    every: int
    key: str

    @classmethod
    def for_run(cls, runtime: RuntimeParams, variant: Variant, inputs: list[str]) -> Checkpointing | None:
        """Every ``runtime.checkpoint_every`` steps (None when 0) into ``runtime.checkpoint_dir``, keyed by
        the variant's settings and its ``inputs`` (files or folders)."""
        if not runtime.checkpoint_every:
            return None
        key = run_key(variant.model_dump(), inputs)
        return cls(str(Path(runtime.checkpoint_dir) / f"{variant.name}-{key}.pt"), runtime.checkpoint_every, key)

    def due(self, done: int, n_steps: int) -> bool:
        """After ``done`` steps; never after the last one (the stage's outputs replace the checkpoint)."""
        return bool(self.every) and done % self.every == 0 and done < n_steps

    def load(self) -> dict | None:
        """The saved state if there is one and this run wrote it, else None."""
        if not os.path.isfile(self.path):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("key") != self.key:
            log.warning("ignoring checkpoint %s: written by a run with other inputs or settings", self.path)
            return None
        return state


def run_key(variant: dict, inputs: list[str]) -> str:
    """Ties a checkpoint to the settings and inputs of the run that wrote it."""
    h = hashlib.sha1(json.dumps(variant, sort_keys=True).encode())
    for p in inputs:
        path = Path(p)
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def save(
    ck: Checkpointing, trainer: PreferenceTrainer, done: int, history: list[dict[str, float]], curves: Curves
) -> None:
    """The trainer's state after ``done`` steps, with the history and curves so far."""
    from pipeline.io import atomic_path

    ctx = trainer.ctx
    # Every rank takes part in gathering the full states; rank 0 writes.
    state = {
        "key": ck.key,
        "step": done,
        "model": distributed.full_state_dict(trainer.model, ctx, trainable_only=True),
        "optim": distributed.optimizer_state(trainer.model, trainer.opt, ctx),
        "sched": trainer.sched.state_dict(),
        "rng": _random_states(trainer),
        "history": history,
        "curves": {"fixed": curves.fixed, "probe": curves.probe},
    }
    if ctx.is_main:
        with atomic_path(ck.path) as tmp:
            torch.save(state, tmp)
    distributed.barrier(ctx)


def resume(ck: Checkpointing | None, trainer: PreferenceTrainer, curves: Curves) -> tuple[list[dict[str, float]], int]:
    """Restore model, optimiser, schedule and ``curves`` from a matching checkpoint: (its history, steps done).
    Rank 0 reads it and sends it to the others: on a run across machines only the leader has it."""
    state = distributed.from_rank0(ck.load() if ck is not None and trainer.ctx.is_main else None, trainer.ctx)
    if state is None:
        return [], 0
    distributed.load_states(trainer.model, trainer.opt, state["model"], state["optim"], trainer.ctx)
    trainer.sched.load_state_dict(state["sched"])
    _restore_random_state(trainer, state["rng"])
    curves.fixed[:], curves.probe[:] = state["curves"]["fixed"], state["curves"]["probe"]
    return list(state["history"]), state["step"]


def _random_states(trainer: PreferenceTrainer) -> list[dict]:
    """Every rank's random state (CPU, and its GPU's), in rank order."""
    on_gpu = trainer.device.type == "cuda"
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(trainer.device) if on_gpu else None}
    if not trainer.ctx.distributed:
        return [mine]
    states: list = [None] * trainer.ctx.world
    torch.distributed.all_gather_object(states, mine)
    return states


def _restore_random_state(trainer: PreferenceTrainer, states: list[dict]) -> None:
    """This rank's random state from the checkpoint; on another number of processes random draws (dropout)
    go on from a fresh seed instead."""
    ctx = trainer.ctx
    if len(states) != ctx.world:
        log.warning("checkpoint written by %d process(es), resumed on %d: random draws differ", len(states), ctx.world)
        return
    torch.set_rng_state(states[ctx.rank]["cpu"])
    if states[ctx.rank]["cuda"] is not None and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(states[ctx.rank]["cuda"], trainer.device)
