"""Launcher of ``test_uneven_steps``: ``python uneven_worker.py NPROC SPEC OUT``.

Starts NPROC processes that join one gloo group the way torchrun's workers do (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` read by :func:`pipeline.training.distributed.init`).
For each strategy of SPEC (a ``torch.save``d dict the test writes) and each of its cases, they
train a fresh copy of the model with :func:`train_preference`; rank 0 writes the histories and
final full weights to OUT. The workers are forked once torch and transformers are imported (before
any computation has started torch's thread pools): paying the imports once, not once per process,
keeps the test fast on few cores. One failing worker ends the others (``torch.multiprocessing``),
so a mismatch of collectives fails the test rather than hanging it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys

import torch

# Imported before the fork (the workers would each take seconds over them), with what the train
# loop imports lazily: DDP, FSDP2, its state dicts, the model class, tqdm.
import torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.multiprocessing as mp
import torch.nn.parallel  # noqa: F401
import tqdm.auto  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM  # noqa: F401

from pipeline.model import loading
from pipeline.settings.train import RuntimeParams
from pipeline.training import distributed
from pipeline.training.trainer import RunOptions, train_preference


def worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx = distributed.init(
        RuntimeParams(
            nproc=world,
            backend="gloo",
            strategy="ddp",
            offload=False,
            cpu_allocator="system",  # a worker: the allocator is its launcher's
            checkpoint_every=0,
            checkpoint_dir=".",
            nnodes=1,
            rdzv_endpoint="localhost:29400",
            rdzv_id="test",
            rdzv_timeout=60,
        )
    )
    results: dict[str, list[dict]] = {}
    for strategy in spec["strategies"]:  # one process group serves both: only the wrapping differs
        sctx = dataclasses.replace(ctx, strategy=strategy)
        results[strategy] = []
        for case in spec["cases"]:
            model = loading.load_model(spec["model"], "float32")
            history = train_preference(
                model,
                case["examples"],
                case["terms"],
                case["settings"],
                pad_id=spec["pad_id"],
                ctx=sctx,
                run=RunOptions(buckets=case["buckets"]),
            )
            results[strategy].append({"history": history, "weights": distributed.full_state_dict(model, sctx)})
    if ctx.is_main:
        torch.save(results, out_path)
    distributed.shutdown(ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(nproc: str, spec_path: str, out_path: str) -> None:
    spec = torch.load(spec_path, weights_only=False)
    world = int(nproc)
    mp.start_processes(worker, args=(world, free_port(), spec, out_path), nprocs=world, start_method="fork")


if __name__ == "__main__":
    main(*sys.argv[1:])
