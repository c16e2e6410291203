"""The train stage's processes on one machine or several: this machine's runtime settings, the torchrun command
that starts them, and, across machines, the rank order that makes the leader's processes come first.

One machine, the leader, runs the stage (``dvc repro train@<v>``). With ``train.runtime.nproc > 1`` or
``nnodes > 1`` the stage starts itself again under torchrun; across machines with a c10d rendezvous at
``train.runtime.rdzv_endpoint``, whose store the leader's torchrun hosts (``is_host``). Every other machine, a
follower, runs ``python -m pipeline.training.follow``, which starts the same stage under torchrun as a
follower. torchrun tells each process its machine's role (``--role``: the ``ROLE_NAME`` variable) but numbers
the machines in an order of its own (by host name and process id), so :func:`init_process_group` numbers the
processes again before the process group forms: the leader's first. Rank 0, which reads a checkpoint, gathers
the trained weights and writes every output, is then the leader's local rank 0, and a follower writes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.settings.base import ConfigError

if TYPE_CHECKING:
    from pipeline.settings.train import RuntimeParams

# Environment variables that set a runtime field on one machine: a follower's GPU count or the address under
# which it reaches the leader may differ from params.yaml's. Not DVC params, like the rest of train.runtime.
ENV = {
    "nproc": "DPO_TRAIN_NPROC",
    "nnodes": "DPO_TRAIN_NNODES",
    "rdzv_endpoint": "DPO_TRAIN_RDZV_ENDPOINT",
    "rdzv_id": "DPO_TRAIN_RDZV_ID",
}
LEADER, FOLLOWER = "leader", "follower"
# How long a process waits for the others' roles before the process group forms (they all passed the
# rendezvous moments before, so this only bounds a machine that died in between).
ROLE_TIMEOUT = timedelta(seconds=300)


def node_runtime(runtime: RuntimeParams, environ: dict[str, str] | None = None) -> RuntimeParams:
    """``train.runtime`` with this machine's :data:`ENV` overrides; a bad value names its variable."""
    env = os.environ if environ is None else environ
    overrides = {field: env[var] for field, var in ENV.items() if env.get(var)}
    if not overrides:
        return runtime
    try:
        return type(runtime).model_validate({**runtime.model_dump(), **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        raise ConfigError(
            f"{ENV.get(field, field)}={env.get(ENV.get(field, ''), '')!r}: {err['msg']} "
            f"(it sets train.runtime.{field} on this machine)"
        ) from None


def needs_torchrun(runtime: RuntimeParams) -> bool:
    return runtime.nproc > 1 or runtime.nnodes > 1


def torchrun_command(runtime: RuntimeParams, role: str, module: str, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run ... -m module argv``: ``runtime.nproc`` processes on this machine,
    alone (``--standalone``) or, with ``runtime.nnodes > 1``, meeting the other machines at the rendezvous as
    ``role`` (:data:`LEADER` hosts its store)."""
    if role not in (LEADER, FOLLOWER):
        raise ValueError(f"role must be {LEADER} or {FOLLOWER}, got {role!r}")
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={runtime.nproc}"]
    t = runtime.rdzv_timeout
    if runtime.nnodes == 1:
        if role == FOLLOWER:
            raise ConfigError(
                "train.runtime.nnodes is 1 on this machine: there is no run across machines to join (set it, "
                f"or {ENV['nnodes']}, to the number of machines)"
            )
        return [*launch, "--standalone", "-m", module, *argv]
    return [
        *launch,
        f"--nnodes={runtime.nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={runtime.rdzv_endpoint}",
        f"--rdzv-id={runtime.rdzv_id}",
        # a follower may start before the leader: it keeps trying to reach the store as long as the nodes wait
        f"--rdzv-conf=is_host={int(role == LEADER)},join_timeout={t},read_timeout={t}",
        f"--role={role}",
        # a lost machine fails the run (the leader's rerun resumes from its last checkpoint)
        "--max-restarts=0",
        "-m",
        module,
        *argv,
    ]


def relaunch(runtime: RuntimeParams, role: str, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` under torchrun (:func:`torchrun_command`); return its exit status."""
    return subprocess.call(torchrun_command(runtime, role, module, argv))


def across_machines() -> bool:
    """Whether this process was started by :func:`torchrun_command` for a run across machines."""
    return os.environ.get("ROLE_NAME") in (LEADER, FOLLOWER)


@dataclass(frozen=True)
class Node:
    """One machine of the run: its role, host, torchrun's number for it and the ranks of its processes."""

    role: str
    host: str
    group_rank: int
    ranks: tuple[int, ...]

    def __str__(self) -> str:
        first, last = self.ranks[0], self.ranks[-1]
        if len(self.ranks) == 1:
            ranks = f"rank {first}"
        elif list(self.ranks) == list(range(first, last + 1)):
            ranks = f"ranks {first}-{last}"
        else:
            ranks = "ranks " + ", ".join(map(str, self.ranks))
        return f"{self.role} node {self.group_rank} on {self.host} ({ranks})"


@dataclass(frozen=True)
class Nodes:
    """The machines of a run across several, and where its processes meet: torchrun's store for the workers
    (``MASTER_ADDR:MASTER_PORT``, hosted by the torchrun of the machine it numbered 0) and the keys this run
    keeps there."""

    of_rank: tuple[Node, ...]  # the node of each rank, in the order the process group uses
    store_host: str
    store_port: int
    prefix: str

    @property
    def nodes(self) -> list[Node]:
        return list(dict.fromkeys(self.of_rank))

    def store_node(self) -> Node:
        """The node whose torchrun hosts the store."""
        return next(n for n in self.of_rank if n.group_rank == 0)

    def client(self, timeout: timedelta):
        import torch.distributed as dist

        return dist.TCPStore(self.store_host, self.store_port, is_master=False, timeout=timeout)


def leader_first(roles: list[dict[str, Any]]) -> list[int]:
    """torchrun's ranks in the new order (``new rank -> torchrun's rank``): the leader's processes first,
    every node's in torchrun's order. ``roles[r]`` is torchrun's rank r's ``{"role", "group_rank", ...}``."""
    leaders = sorted({r["group_rank"] for r in roles if r["role"] == LEADER})
    if len(leaders) != 1:
        found = f"{len(leaders)} ({', '.join(f'node {g}' for g in leaders)})" if leaders else "none"
        raise RuntimeError(
            f"a run across machines needs exactly one leader (the machine that runs the stage), found {found}; "
            "the others join with `python -m pipeline.training.follow`"
        )
    return sorted(range(len(roles)), key=lambda r: roles[r]["role"] != LEADER)


def init_process_group(backend: str, rank: int, world: int) -> tuple[int, Nodes]:
    """Join the process group of a run across machines with the leader's processes first; return this
    process's rank there and the run's :class:`Nodes`. Every process calls it (a collective)."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, timeout=ROLE_TIMEOUT)
    prefix = (
        f"dpo-pipeline/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    )
    me = {"role": os.environ["ROLE_NAME"], "group_rank": int(os.environ["GROUP_RANK"]), "host": socket.gethostname()}
    store.set(f"{prefix}/role/{rank}", json.dumps(me))
    roles = [json.loads(store.get(f"{prefix}/role/{r}")) for r in range(world)]
    order = leader_first(roles)
    new_rank = order.index(rank)
    os.environ["RANK"] = str(new_rank)  # what the process group and anything reading the variable agree on
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore(f"{prefix}/pg", store), rank=new_rank, world_size=world
    )
    by_group: dict[int, list[int]] = {}
    for new, old in enumerate(order):
        by_group.setdefault(roles[old]["group_rank"], []).append(new)
    nodes = {
        g: Node(roles[order[ranks[0]]]["role"], roles[order[ranks[0]]]["host"], g, tuple(ranks))
        for g, ranks in by_group.items()
    }
    of_rank = tuple(nodes[roles[old]["group_rank"]] for old in order)
    return new_rank, Nodes(of_rank, host, port, prefix)
