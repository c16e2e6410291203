"""Launcher of ``test_multinode``: ``python multinode_worker.py PORT OUT ROOT``.

Two processes join one gloo group the way torchrun's workers of a run across two machines do: torchrun's store
at ``MASTER_ADDR:MASTER_PORT`` (here the test's), ``ROLE_NAME`` and ``GROUP_RANK`` of their machine, and
torchrun's ``RANK``, which numbers the follower's process first. Each calls
:func:`pipeline.training.distributed.init`, then :func:`pipeline.training.node_check.verify` with a fingerprint
of the checkout ``ROOT`` whose params differ on the follower, and writes what it saw to
``OUT.<torchrun rank>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch.multiprocessing as mp

from pipeline.settings.train import RuntimeParams
from pipeline.training import distributed, node_check

ROLES = ("follower", "leader")  # torchrun's rank 0 is on the follower, as torchrun may number them


def worker(rank: int, port: int, out: str, root: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ROLE_NAME=ROLES[rank],
        GROUP_RANK=str(rank),
        TORCHELASTIC_RUN_ID="test-run",
    )
    rt = RuntimeParams(
        nproc=1,
        backend="gloo",
        strategy="ddp",
        offload=False,
        cpu_allocator="system",  # a worker: the allocator is its launcher's
        checkpoint_every=0,
        checkpoint_dir=".",
        nnodes=2,
        rdzv_endpoint="127.0.0.1:1",
        rdzv_id="test",
        rdzv_timeout=60,
    )
    ctx = distributed.init(rt)
    assert ctx.nodes is not None
    seen: dict = {"rank": ctx.rank, "nodes": [str(n) for n in ctx.nodes.of_rank], "env_rank": os.environ["RANK"]}
    node_check.verify(ctx, "train", {"lr": 0.1}, root)  # all agree: passes
    try:
        node_check.verify(ctx, "train", {"lr": 0.1 * (rank + 1)}, root)
    except node_check.NodesDiffer as e:
        seen["error"] = str(e)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(seen, f)
    distributed.shutdown(ctx)


if __name__ == "__main__":
    mp.start_processes(worker, args=(int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=2, start_method="fork")
