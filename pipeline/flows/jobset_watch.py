"""Running a JobSet from a flow: create it, follow it to its end with its pods' log lines, and explain a failure.

:class:`JobSetWatch` talks to the cluster through two clients of ``kubernetes_asyncio`` (the one
prefect-kubernetes uses): ``CustomObjectsApi`` for the JobSet and ``CoreV1Api`` for its pods. Every
``poll_s`` it reads the JobSet's state and each pod's log lines since the last read (by their timestamps), and
hands the lines to ``log`` (the flow run's logger). When the JobSet has failed it raises :class:`JobSetFailed`
with the JobSet's reason, each failed pod's exit and the last lines of its log; past the time limit it deletes
the JobSet and raises too.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pipeline.flows.jobset import GROUP, PLURAL, VERSION

NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet's label on every pod of a JobSet


class JobSetFailed(RuntimeError):
    """A JobSet that failed or ran out of time; the message says why, with the failed pods' log tails."""


def terminal_state(jobset: dict[str, Any]) -> tuple[str | None, str]:
    """(``Completed`` | ``Failed`` | None while it runs, the reason and message of that condition)."""
    status = jobset.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Completed", "Failed") and cond.get("status") == "True":
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    state = status.get("terminalState")
    return (state, "") if state in ("Completed", "Failed") else (None, "")


def _timestamp_key(stamp: str) -> tuple[str, str]:
    """An RFC 3339 timestamp with nanoseconds as a sortable key (Kubernetes drops trailing zeros)."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return head, frac.ljust(9, "0")


def pod_exit(pod: Any) -> str:
    """How a failed pod ended: its containers' exit codes and reasons."""
    parts = []
    for cs in pod.status.container_statuses or []:
        term = cs.state.terminated if cs.state else None
        if term is not None:
            parts.append(f"exit code {term.exit_code}" + (f" ({term.reason})" if term.reason else ""))
    return ", ".join(parts) or (pod.status.reason or pod.status.phase or "unknown")


class JobSetWatch:
    """One JobSet (``manifest``) from creation to its end, its pods' logs going to ``log``."""

    def __init__(
        self,
        custom: Any,
        core: Any,
        manifest: dict[str, Any],
        log: Callable[[str], Any],
        *,
        poll_s: float,
        tail_lines: int,
    ):
        self.custom, self.core, self.manifest, self.log = custom, core, manifest, log
        self.name, self.namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
        self.poll_s, self.tail_lines = poll_s, tail_lines
        self.last_seen: dict[str, tuple[str, str]] = {}  # pod -> timestamp of its last line logged
        self.tails: dict[str, deque[str]] = {}  # pod -> its last lines, for the failure message

    async def run(self, timeout_s: float) -> str:
        """Create the JobSet and wait for its end; the Completed condition's reason, or :class:`JobSetFailed`.
        ``timeout_s``: 0 for no limit."""
        await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.manifest)
        self.log(f"created JobSet {self.namespace}/{self.name}")
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while True:
            jobset = await self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
            state, why = terminal_state(jobset)
            pods = await self.pods()
            await self.new_log_lines(pods)
            if state == "Completed":
                return why or "Completed"
            if state == "Failed":
                raise JobSetFailed(self.failure(why, pods))
            if deadline is not None and time.monotonic() > deadline:
                await self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
                raise JobSetFailed(self.failure(f"timed out after {timeout_s:g} s; deleted it", pods))
            await asyncio.sleep(self.poll_s)

    async def pods(self) -> list[Any]:
        listed = await self.core.list_namespaced_pod(self.namespace, label_selector=f"{NAME_LABEL}={self.name}")
        return sorted(listed.items, key=lambda p: p.metadata.name)

    def short(self, pod: Any) -> str:
        return pod.metadata.name.removeprefix(f"{self.name}-")

    async def new_log_lines(self, pods: list[Any]) -> None:
        """Each pod's lines since the last read (a window of a few polls, deduplicated by timestamp)."""
        window = int(3 * self.poll_s) + 5
        for pod in pods:
            name = pod.metadata.name
            try:
                text = await self.core.read_namespaced_pod_log(
                    name, self.namespace, timestamps=True, since_seconds=window
                )
            except Exception:  # noqa: BLE001  (a pod still pending or already gone has no log to read)
                continue
            tail = self.tails.setdefault(name, deque(maxlen=self.tail_lines))
            for line in (text or "").splitlines():
                stamp, _, message = line.partition(" ")
                key = _timestamp_key(stamp)
                if name in self.last_seen and key <= self.last_seen[name]:
                    continue
                self.last_seen[name] = key
                tail.append(message)
                self.log(f"[{self.short(pod)}] {message}")

    def failure(self, why: str, pods: list[Any]) -> str:
        failed = [p for p in pods if p.status.phase == "Failed"]
        lines = [f"JobSet {self.namespace}/{self.name} failed: {why or 'no reason given'}"]
        for pod in failed:
            tail = "\n".join(f"    {line}" for line in self.tails.get(pod.metadata.name, ())) or "    (no log)"
            lines.append(f"  pod {self.short(pod)}: {pod_exit(pod)}; last lines of its log:\n{tail}")
        if not failed:
            lines.append("  no pod failed (see `kubectl describe jobset` for the JobSet's events)")
        return "\n".join(lines)
