"""A follower machine of a training run across machines: join the leader's `train@<variant>` and take a share of
every step, writing nothing but its log.

    python -m pipeline.training.follow --variant dpo            # in a checkout at the leader's commit
    python -m pipeline.training.follow --variant dpo --pull     # first restore the stage's inputs from DVC

The leader is the machine that runs the stage (``dvc repro train@dpo`` with ``train.runtime.nnodes > 1``).
This starts the same stage under torchrun as a follower (:func:`pipeline.training.multinode.torchrun_command`)
with this machine's ``train.runtime`` (``nproc`` and the rendezvous, each overridable per machine:
:data:`pipeline.training.multinode.ENV`). The stage reads its inputs here, so they must be the leader's:
``--pull`` restores them as the cluster's pods do: ``dvc pull --run-cache``, then ``dvc repro --single-item
--pull`` of each stage upstream of ``train@<variant>``, which pulls the outputs of a stage whose ``dvc.lock``
entry this checkout holds, restores one the remote's run-cache holds, and computes any other. Before the first
step the leader compares every machine's commit, params and inputs with
its own and refuses to train with one that differs (:mod:`pipeline.training.node_check`).
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import time

from pipeline.settings.base import DEFAULT_PARAMS, ConfigError
from pipeline.settings.train import Training
from pipeline.training import multinode

log = logging.getLogger("pipeline.training.follow")

STAGE_MODULE = "stages.train"


def upstream_stages(stage: str) -> list[str]:
    """The DVC stages ``stage`` needs, in the order ``dvc repro`` runs them (``stage`` left out)."""
    from pipeline.flows.dag import stage_order

    return [s for s in stage_order(".", [stage]) if s != stage]


def dvc(*args: str) -> None:
    """``dvc <args>`` here, its output passed through; a failure stops the follower, naming the command."""
    cmd = [sys.executable, "-m", "dvc", *args]
    log.info("%s", " ".join(cmd[2:]))
    if subprocess.call(cmd):
        raise SystemExit(f"follower: `{' '.join(cmd[2:])}` failed; this machine cannot get the stage's inputs")


def pull_inputs(stage: str, remote: str | None) -> None:
    """Restore the inputs of ``stage`` from the DVC remote (``remote``, else the default one)."""
    to = ["-r", remote] if remote else []
    dvc("pull", *to, "--run-cache", "--allow-missing")
    for s in upstream_stages(stage):
        dvc("repro", "--single-item", "--pull", s)


def wait_for_leader(endpoint: str, timeout_s: float) -> None:
    """Until the leader's host name resolves: a follower pod may start before the leader's DNS record exists,
    and torchrun gives up on a name it cannot resolve. Reaching the store itself is torchrun's to retry."""
    host = endpoint.rsplit(":", 1)[0]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.getaddrinfo(host, None)
            return
        except socket.gaierror as e:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"follower: the leader's host {host} does not resolve after {timeout_s:g} s ({e})"
                ) from None
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True, help="the leader's train.variants key (train@<variant>)")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    parser.add_argument("--pull", action="store_true", help="restore the stage's inputs from the DVC remote first")
    parser.add_argument("--remote", help="the DVC remote of --pull's run-cache (default: the default remote)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = Training.load(args.params)
        cfg.variant(args.variant)
        runtime = multinode.node_runtime(cfg.train.runtime)
        command = multinode.torchrun_command(
            runtime, multinode.FOLLOWER, STAGE_MODULE, ["--variant", args.variant, "--params", args.params]
        )
    except ConfigError as e:
        raise SystemExit(f"follower: {e}") from None
    if args.pull:
        pull_inputs(f"train@{args.variant}", args.remote)
    wait_for_leader(runtime.rdzv_endpoint, runtime.rdzv_timeout)
    log.info(
        "joining %s's rendezvous %s at %s as a follower with %d process(es)",
        f"train@{args.variant}",
        runtime.rdzv_id,
        runtime.rdzv_endpoint,
        runtime.nproc,
    )
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
