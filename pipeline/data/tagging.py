"""Pair tags: token-level edit distance, first difference, sources and the data scenario of the
3D-properties paper (Yan et al. 2024, arXiv 2406.07327).

Scenarios (docs/losses.md, claim 3): 1 = chosen and rejected both sampled from the policy,
2 = chosen is the dataset's gold solution and rejected from the policy, 3 = chosen from the
policy and rejected from another model, 4 = chosen from the dataset and rejected from another model.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

SCENARIO_SOURCES = {1: ("policy", "policy"), 2: ("gold", "policy"), 3: ("policy", "other"), 4: ("gold", "other")}


def scenario_of(chosen_source: str, rejected_source: str) -> int:
    for k, v in SCENARIO_SOURCES.items():
        if v == (chosen_source, rejected_source):
            return k
    raise ValueError(f"no scenario for chosen from {chosen_source!r} and rejected from {rejected_source!r}")


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token-id sequences (rapidfuzz compares hashable items)."""
    return Levenshtein.distance(list(a), list(b))


def normalised_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Distance / max(len): 0 for identical sequences, 1 for nothing in common."""
    return Levenshtein.normalized_distance(list(a), list(b))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """Index of the first differing token; ``min(len)`` when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def bucket_of(value: float, edges: Sequence[float]) -> str:
    """Label of the half-open bucket ``[lo, hi)`` that holds ``value`` (last bucket closed)."""
    bounds = [0.0, *edges, 1.0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if value < hi or hi == 1.0:
            return f"[{lo:.2f},{hi:.2f}{']' if hi == 1.0 else ')'}"
    raise AssertionError("unreachable")


def bucket_labels(edges: Sequence[float]) -> list[str]:
    bounds = [0.0, *edges, 1.0]
    return [f"[{lo:.2f},{hi:.2f}{']' if hi == 1.0 else ')'}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def bucket_slug(label: str) -> str:
    """A file-name-safe form of a bucket label: ``[0.25,0.50)`` -> ``0.25-0.50``."""
    return label.strip("[]()").replace(",", "-")
