"""Launcher of ``test_large_models``: ``python large_model_worker.py NPROC SPEC OUT``.

Starts NPROC gloo processes as :mod:`uneven_worker` does (forked after the heavy imports; one failing
worker ends the others). Each rank:

- takes one ``train_step`` of the spec's pairs under DDP and under FSDP2, each without and with activation
  checkpointing: the loss, the full gradients the optimiser steps with, and how often decoder layer 0 ran;
- loads the model folder with :func:`pipeline.training.sharded_loading.load_sharded` (meta device, FSDP2
  with CPU offload, checkpointing on), records what it holds and whether it read the checkpoint, and
  trains it with :func:`train_preference`.

Rank 0 writes the records to OUT, with what every rank read and holds.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from uneven_worker import free_port  # also imports what the train loop needs, before the fork

from pipeline.model import loading
from pipeline.settings.train import RuntimeParams
from pipeline.training import distributed, sharded_loading
from pipeline.training.trainer import PreferenceTrainer, train_preference


def full(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a DTensor shard gathered from every rank (a collective), else itself."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def one_step(spec: dict, ctx: distributed.Context, settings) -> dict:
    model = loading.load_model(spec["model"], "float32")
    calls: list[int] = []
    model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    trainer = PreferenceTrainer(model, spec["terms"], settings, pad_id=spec["pad_id"], ctx=ctx)
    grads: dict[str, torch.Tensor] = {}

    def keep_gradients(*_):
        grads.update({n: full(p.grad) for n, p in model.named_parameters()})

    trainer.opt.register_step_pre_hook(keep_gradients)
    ex = spec["examples"]
    metrics = trainer.step_metrics(trainer.train_step(ex, list(range(len(ex)))))
    return {"loss": metrics["loss"], "grads": grads, "layer_calls": len(calls)}


def sharded_run(spec: dict, ctx: distributed.Context) -> dict:
    settings = spec["settings"].model_copy(update={"gradient_checkpointing": True})
    reads: list[str] = []
    load_model = loading.load_model

    def counted(path, dtype, *args):
        reads.append(str(path))
        return load_model(path, dtype, *args)

    loading.load_model = counted
    try:
        model = sharded_loading.load_sharded(spec["model"], "float32", ctx, settings)
    finally:
        loading.load_model = load_model
    params = {
        n: {
            "type": type(p).__name__,
            "shape": tuple(p.shape),
            "local_shape": tuple(p.to_local().shape),
            "device": str(p.to_local().device),
        }
        for n, p in model.named_parameters()
    }
    loaded = distributed.full_state_dict(model, ctx)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    history = train_preference(model, spec["examples"], spec["terms"], settings, pad_id=spec["pad_id"], ctx=ctx)
    return {
        "reads": reads,
        "params": params,
        "loaded": loaded,
        "buffers": buffers,
        "history": history,
        "trained": distributed.full_state_dict(model, ctx),
    }


def worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx = distributed.init(
        RuntimeParams(
            nproc=world,
            backend="gloo",
            strategy="fsdp",
            offload=True,
            cpu_allocator="system",  # a worker: the allocator is its launcher's
            checkpoint_every=0,
            checkpoint_dir=".",
            nnodes=1,
            rdzv_endpoint="localhost:29400",
            rdzv_id="test",
            rdzv_timeout=60,
        )
    )
    steps = {}
    for strategy in ("ddp", "fsdp"):
        for checkpointing in (False, True):
            settings = spec["settings"].model_copy(update={"gradient_checkpointing": checkpointing})
            plain = dataclasses.replace(ctx, strategy=strategy, offload=False)
            steps[strategy, checkpointing] = one_step(spec, plain, settings)
    sharded = sharded_run(spec, ctx)
    # What each rank read and holds; the gathered tensors are the same on every rank, so rank 0's serve.
    held: list = [None] * world
    dist.all_gather_object(held, {k: sharded.pop(k) for k in ("reads", "params")})
    if ctx.is_main:
        torch.save({"steps": steps, "sharded": sharded, "ranks": held}, out_path)
    distributed.shutdown(ctx)


def main(nproc: str, spec_path: str, out_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    world = int(nproc)
    mp.start_processes(worker, args=(world, free_port(), spec, out_path), nprocs=world, start_method="fork")


if __name__ == "__main__":
    main(*sys.argv[1:])
