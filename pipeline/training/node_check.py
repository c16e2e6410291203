"""Before a run across machines trains: every machine must run the same code on the same settings and inputs.

Each process takes a fingerprint of what it runs (:func:`fingerprint`): the git commit, a hash of every file
the stage lists as a dep in dvc.yaml (its code and its input data) and of the settings it read (the stage's
params and, of ``train.runtime``, :data:`SHARED_RUNTIME`: the rest may differ per machine). :func:`verify`
gathers them and compares each machine's with the leader's; a follower on another commit, or with other code,
inputs or params, stops the run before the first step with an error that names the machine and what differs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from pipeline.stage_deps import stage_modules
from pipeline.training import distributed
from pipeline.training.multinode import LEADER

# Files up to this size are hashed whole; a larger one (model weights) by its size, first and last MiB, which
# tell checkpoints apart (pipeline.model.loading.fingerprint does the same) without reading gigabytes.
WHOLE_FILE_BYTES = 64 << 20
EDGE_BYTES = 1 << 20
# The train.runtime fields every machine must share (the process group's backend and how the model is
# wrapped); the others (nproc, checkpoints, the rendezvous as each machine reaches it) may differ.
SHARED_RUNTIME = ("backend", "strategy", "offload")


class NodesDiffer(RuntimeError):
    """A machine of the run has other code, settings or inputs than the leader."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(EDGE_BYTES), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read())
    return h.hexdigest()[:16]


def digest(path: str | Path) -> str:
    """A content hash of a file, or of a folder's files with their relative paths; ``missing`` if absent."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def git_commit(root: str | Path = ".") -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "not a git checkout"


def fingerprint(stage: str, settings: dict[str, Any], root: str | Path = ".") -> dict[str, str]:
    """What this machine runs: ``commit``, ``params`` (a hash of ``settings``) and every dep of ``stage`` (a
    dvc.yaml stage or foreach group) by its path."""
    root = Path(root)
    _, deps = stage_modules(root / "dvc.yaml")[stage]
    params = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"commit": git_commit(root), "params": params, **{d: digest(root / d) for d in deps}}


def differences(leader: dict[str, str], other: dict[str, str]) -> list[str]:
    """What differs between two fingerprints, one phrase each."""
    out = []
    for key in sorted(set(leader) | set(other), key=lambda k: (k not in ("commit", "params"), k)):
        mine, theirs = leader.get(key), other.get(key)
        if mine == theirs:
            continue
        if key == "commit":
            out.append(f"git commit {theirs} (the leader's: {mine})")
        elif key == "params":
            out.append("the params (params.yaml) the stage reads")
        elif theirs == "missing":
            out.append(f"{key} is missing")
        else:
            out.append(f"{key} differs")
    return out


def verify(ctx: distributed.Context, stage: str, settings: dict[str, Any], root: str | Path = ".") -> None:
    """Compare every machine's :func:`fingerprint` with the leader's (a collective; a no-op on one machine).
    Each machine's first process takes it. Raises :class:`NodesDiffer` on every rank, naming each machine
    that differs and how."""
    import torch.distributed as dist

    if ctx.nodes is None:
        return
    mine = fingerprint(stage, settings, root) if ctx.local_rank == 0 else None
    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, mine)
    lines = []
    for node in ctx.nodes.nodes:
        if node.role == LEADER:
            continue
        diff = differences(parts[0], parts[node.ranks[0]])
        if diff:
            lines.append(f"{node}: {'; '.join(diff)}")
    if lines:
        raise NodesDiffer(
            "machines of this run differ from the leader, which refuses to train with them: "
            + " | ".join(lines)
            + ". Every machine needs the leader's commit, params.yaml and inputs (pipeline.training.follow --pull "
            "restores the inputs from the DVC remote)"
        )
