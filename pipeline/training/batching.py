"""Which pairs each optimiser step sees (shared by the preference trainer and the SFT warm-up)."""

from __future__ import annotations

import random


def step_batches(n: int, batch_size: int, epochs: int, seed: int, *, drop_tail: bool = False) -> list[list[int]]:
    """Index lists of each optimiser step: a fresh seeded shuffle per epoch.

    Each epoch's last batch is short when ``batch_size`` does not divide ``n``; ``drop_tail`` drops it,
    so that every step sees ``batch_size`` pairs (a different ``n mod batch_size`` pairs each epoch,
    as the shuffle differs), else it is kept. With fewer than ``batch_size`` pairs every step sees all
    ``n`` (the same size again)."""
    out = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        stop = n - n % batch_size if drop_tail and n >= batch_size else n
        out += [order[s : s + batch_size] for s in range(0, stop, batch_size)]
    return out
