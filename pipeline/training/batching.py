"""Which pairs each optimiser step sees (shared by the preference trainer and the SFT warm-up)."""

from __future__ import annotations

import random


def step_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index lists of each optimiser step: a fresh seeded shuffle per epoch; a short tail batch kept."""
    out = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out += [order[s: s + batch_size] for s in range(0, n, batch_size)]
    return out
