"""The chunk folder that sampling processes share: finished chunks, and leases on the chunks being sampled.

One folder, on one machine or on a volume that several machines mount (NFS, a ReadWriteMany volume). Every
process sampling the same prompts (the sample stage and any number of ``--worker`` processes) goes through the
same list of chunks and samples those that are neither finished nor leased. A lease is a file created with
``O_EXCL``, so exactly one process gets it; its holder touches it every quarter of ``lease_s``. A lease left
untouched for ``lease_s``, or whose holder is a process of this machine that no longer exists, is taken over:
the next process creates the lease of the next generation, again with ``O_EXCL``, so exactly one takes it over.

Leases only save work; correctness does not rest on them. A chunk's file name is the hash of everything that
determines its candidates, and it is written atomically, so a chunk sampled twice (by a holder so slow that
its lease was taken over) is written twice with the same candidates, and a reader sees one whole file or
the other.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.generation.types import Candidate
from pipeline.io import atomic_path

log = logging.getLogger("pipeline.generation.chunk_store")

LEASE_INFIX = ".lease-"


def holder_id() -> dict:
    """Who holds a lease: this machine's host name and this process's id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class Lease:
    """A claim on one chunk, kept alive by a background thread that touches its file until released."""

    def __init__(self, path: Path, renew_every_s: float):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, args=(renew_every_s,), daemon=True)
        self._thread.start()

    def _renew(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # cleared by a process that finished the chunk: nothing left to hold
                return
            except OSError as e:  # a shared volume's hiccup: the next renewal may succeed
                log.warning("could not renew the lease %s (%s)", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ChunkFolder:
    """Finished chunks (``chunk-<key>.parquet``) and leases (``chunk-<key>.lease-<generation>``) in ``root``."""

    def __init__(self, root: str | os.PathLike, lease_s: float):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self.me = holder_id()

    @property
    def poll_s(self) -> float:
        """How often a lease is renewed, and how often a process waiting on other processes' chunks looks."""
        return self.lease_s / 4

    def path(self, key: str) -> Path:
        return self.root / f"chunk-{key}.parquet"

    def claim(self, key: str) -> Lease | None:
        """A lease on chunk ``key``, or None while another process holds a live one."""
        leases = self._leases(key)
        generation = 0
        if leases:
            top, path = leases[-1]
            if self._alive(path):
                return None
            log.info("taking over chunk %s from %s", key, _holder(path) or "a lease without holder")
            generation = top + 1
        path = self.root / f"chunk-{key}{LEASE_INFIX}{generation}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another process claimed it first
            return None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.me))
        return Lease(path, self.poll_s)

    def clear_leases(self, key: str) -> None:
        """Remove every lease on a chunk that is finished (a holder still renewing one stops)."""
        for _, path in self._leases(key):
            path.unlink(missing_ok=True)

    def write(self, key: str, prompt_ids: Sequence[str], cands: Sequence[Sequence[Candidate]]) -> None:
        """Save a finished chunk atomically (flushed to disk first), then clear its leases."""
        import polars as pl

        rows = [
            {
                "prompt_id": pid,
                "candidate_idx": k,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "logprob_sum": c.logprob_sum,
                "finish_reason": c.finish_reason,
            }
            for pid, per in zip(prompt_ids, cands)
            for k, c in enumerate(per)
        ]
        with atomic_path(self.path(key), fsync=True) as tmp:
            pl.DataFrame(
                rows,
                schema={
                    "prompt_id": pl.String,
                    "candidate_idx": pl.Int32,
                    "text": pl.String,
                    "token_ids": pl.List(pl.Int32),
                    "logprob_sum": pl.Float64,
                    "finish_reason": pl.String,
                },
            ).write_parquet(tmp)
        self.clear_leases(key)

    def read(self, key: str, prompt_ids: Sequence[str], n: int) -> list[list[Candidate]] | None:
        """A finished chunk's candidates in prompt order; None if it is not there, or (with a warning) if it is
        unreadable or does not hold ``n`` candidates for each of ``prompt_ids``."""
        import polars as pl

        path = self.path(key)
        if not path.exists():
            return None
        try:
            df = pl.read_parquet(path)
            groups = {pid: g.sort("candidate_idx") for (pid,), g in df.group_by("prompt_id")}
            if set(groups) != set(prompt_ids) or any(len(g) != n for g in groups.values()):
                raise ValueError("prompts or candidate counts differ from the chunk's key")
        except Exception as e:  # noqa: BLE001 - a damaged chunk is resampled, never trusted
            log.warning("ignoring cached chunk %s (%s); sampling it again", path, e)
            return None
        return [
            [
                Candidate(r["text"], tuple(r["token_ids"]), r["logprob_sum"], r["finish_reason"])
                for r in groups[pid].iter_rows(named=True)
            ]
            for pid in prompt_ids
        ]

    def _leases(self, key: str) -> list[tuple[int, Path]]:
        """The chunk's lease files by generation, the current one last."""
        prefix = f"chunk-{key}{LEASE_INFIX}"
        found = []
        for p in self.root.glob(f"{prefix}*"):
            suffix = p.name[len(prefix) :]
            if suffix.isdigit():
                found.append((int(suffix), p))
        return sorted(found)

    def _alive(self, path: Path) -> bool:
        """Whether a lease still holds: renewed within ``lease_s`` and not held by a dead process of this
        machine. A lease just created and not yet written holds by its age alone."""
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # released since it was listed
            return False
        holder = _holder(path)
        if holder and holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", -1))):
            return False
        return age < self.lease_s


def _holder(path: Path) -> dict | None:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):  # gone, or created and not yet written
        return None
    return got if isinstance(got, dict) else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
