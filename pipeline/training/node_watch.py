"""While a run across machines trains: which machine was lost when a collective fails.

A process whose peer dies learns only that a connection closed (gloo: "Connection closed by peer
[10.0.3.7]:41237") or, under NCCL, that a collective timed out. So every process counts up a heartbeat in the
run's store (torchrun's, :class:`pipeline.training.multinode.Nodes`) once a second, and :class:`watching`
turns a failure into one that names the machines whose processes stopped counting, or the machine that hosted
the store when the store itself is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from pipeline.training import distributed
from pipeline.training.multinode import Node, Nodes

log = logging.getLogger("pipeline.training.node_watch")

BEAT_S = 1.0  # between two heartbeats of a process
# After a failure: how long to watch the counters. Several beats, so that a live process, even one busy in a
# long kernel, is seen to count.
SETTLE_S = 4 * BEAT_S
STORE_TIMEOUT = timedelta(seconds=5)


class NodeLost(RuntimeError):
    """A machine of the run stopped during training."""


def _beat_key(nodes: Nodes, rank: int) -> str:
    return f"{nodes.prefix}/beat/{rank}"


def _beat(nodes: Nodes, rank: int, stop: threading.Event) -> None:
    try:
        store = nodes.client(STORE_TIMEOUT)
        n = 0
        while not stop.is_set():
            store.set(_beat_key(nodes, rank), str(n))
            n += 1
            stop.wait(BEAT_S)
    except Exception as e:  # noqa: BLE001  (the store is gone: the failure that follows says so)
        log.debug("heartbeat of rank %d stopped: %s", rank, e)


def _counts(nodes: Nodes, store) -> list[bytes | None]:
    out: list[bytes | None] = []
    for rank in range(len(nodes.of_rank)):
        key = _beat_key(nodes, rank)
        out.append(store.get(key) if store.check([key]) else None)
    return out


def lost_nodes(nodes: Nodes, rank: int) -> tuple[list[Node], bool]:
    """The machines whose processes stopped beating within :data:`SETTLE_S` (other than this process's), and
    whether the store answered at all (if not, its host is the one lost)."""
    try:
        store = nodes.client(STORE_TIMEOUT)
        before = _counts(nodes, store)
        time.sleep(SETTLE_S)
        after = _counts(nodes, store)
    except Exception:  # noqa: BLE001  (a store that no longer answers is the finding)
        host = nodes.store_node()
        return ([] if host is nodes.of_rank[rank] else [host]), False
    stopped = {r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != rank}
    return [n for n in nodes.nodes if stopped & set(n.ranks)], True


@contextmanager
def watching(ctx: distributed.Context) -> Iterator[None]:
    """Beat while the block runs (on a run across machines; nothing on one). A RuntimeError out of the block,
    what a failed collective raises, becomes :class:`NodeLost` naming the lost machines when there are any."""
    nodes = ctx.nodes
    if nodes is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(nodes, ctx.rank, stop), daemon=True, name="node-heartbeat")
    thread.start()
    try:
        yield
    except NodeLost:
        raise
    except RuntimeError as e:
        lost, store_answered = lost_nodes(nodes, ctx.rank)
        if not lost:
            raise
        why = "its processes stopped" if store_answered else "the run's store on it no longer answers"
        raise NodeLost(
            f"lost {', '.join(map(str, lost))} during training ({why}: the machine went away or its processes "
            "exited; see its log). The run stops; run the stage again, with every machine, to resume from the "
            "last checkpoint (train.runtime.checkpoint_every)"
        ) from e
    finally:
        stop.set()
        thread.join()
