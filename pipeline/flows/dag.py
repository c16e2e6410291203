"""The DVC stage graph: stages and their parents from ``dvc dag --dot`` (foreach stages appear
expanded: ``train@dpo``), the order to run them in, targets with everything upstream, and the split
into consecutive runs of one resource class (CPU / GPU) for :mod:`pipeline.flows.cluster`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping

from pipeline.flows.dvc_process import dvc_output
from pipeline.flows.settings import ResourceClass, group_of


def stage_graph(repo: str | os.PathLike) -> tuple[list[str], dict[str, set[str]]]:
    """The stages (in the order ``dvc dag`` lists them, which is dvc.yaml's) and each one's parents."""
    dot = dvc_output(["dag", "--dot"], repo)
    nodes: list[str] = []
    parents: dict[str, set[str]] = {}
    for line in dot.splitlines():
        line = line.strip().rstrip(";")
        if m := re.fullmatch(r'"([^"]+)"\s*->\s*"([^"]+)"', line):
            parents.setdefault(m.group(2), set()).add(m.group(1))
        elif m := re.fullmatch(r'"([^"]+)"', line):
            nodes.append(m.group(1))
    for n in nodes:
        parents.setdefault(n, set())
    return nodes, parents


def topo_order(nodes: list[str], parents: Mapping[str, set[str]]) -> list[str]:
    """Kahn's algorithm; among ready stages, the one listed first by ``dvc dag`` goes first."""
    rank = {n: i for i, n in enumerate(nodes)}
    remaining = {n: set(parents.get(n, ())) & set(nodes) for n in nodes}
    order: list[str] = []
    while remaining:
        ready = sorted((n for n, ps in remaining.items() if not ps), key=rank.__getitem__)
        if not ready:
            raise ValueError(f"dvc dag has a cycle among {sorted(remaining)}")
        n = ready[0]
        order.append(n)
        del remaining[n]
        for ps in remaining.values():
            ps.discard(n)
    return order


def expand_targets(targets: Iterable[str], nodes: list[str]) -> list[str]:
    """Stage names, or foreach groups (``train`` = every ``train@...``); unknown names fail."""
    out: list[str] = []
    for t in targets:
        matched = [n for n in nodes if n == t or group_of(n) == t]
        if not matched:
            raise ValueError(f"unknown stage {t!r}; the stages are: {', '.join(nodes)}")
        out += [m for m in matched if m not in out]
    return out


def with_ancestors(targets: Iterable[str], parents: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(targets)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += parents.get(n, ())
    return seen


def stage_order(repo: str | os.PathLike, targets: Iterable[str] | None = None) -> list[str]:
    """The stages to run, in ``dvc dag`` order: all of them, or the targets and everything upstream of
    them (what ``dvc repro <targets>`` would consider)."""
    nodes, parents = stage_graph(repo)
    order = topo_order(nodes, parents)
    if not targets:
        return order
    keep = with_ancestors(expand_targets(targets, nodes), parents)
    return [n for n in order if n in keep]


def segments(order: list[str], resource_of: Callable[[str], ResourceClass]) -> list[tuple[ResourceClass, list[str]]]:
    """Consecutive stages of one resource class: [("cpu", [prepare]), ("gpu", [policy, sample]), ...]."""
    out: list[tuple[ResourceClass, list[str]]] = []
    for stage, cls in ((s, resource_of(s)) for s in order):
        if out and out[-1][0] == cls:
            out[-1][1].append(stage)
        else:
            out.append((cls, [stage]))
    return out
