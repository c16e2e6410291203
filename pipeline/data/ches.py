"""CHES, the centered hidden embedding similarity of a pair (Razin et al., ICLR 2025, "Unintentional
Unalignment: Likelihood Displacement in Direct Preference Optimization", arXiv 2410.08847).

With ``h_y`` the sum over a response's tokens of the starting policy's last-layer hidden state at the
position that predicts each token (:func:`pipeline.model.logprobs.response_logprobs_and_hidden`)::

    CHES(x, y_w, y_l)      = <h_w, h_l> - ||h_w||^2
    CHES_norm(x, y_w, y_l) = <h_w/|y_w|, h_l/|y_l|> - ||h_w/|y_w|||^2

Higher: the rejected response pulls the chosen one down more (the paper's predictor of likelihood
displacement; its mitigation drops the pairs with the highest CHES before training: :func:`filter_by_ches`).
"""

from __future__ import annotations

import math

import polars as pl
import torch


def ches_scores(
    h_w: torch.Tensor, h_l: torch.Tensor, n_w: torch.Tensor, n_l: torch.Tensor
) -> tuple[list[float], list[float]]:
    """(CHES, length-normalised CHES) per pair from the hidden sums ``[N, d]`` and token counts ``[N]``."""
    h_w, h_l = h_w.double(), h_l.double()
    ches = (h_w * h_l).sum(-1) - (h_w * h_w).sum(-1)
    m_w, m_l = h_w / n_w.double().clamp_min(1)[:, None], h_l / n_l.double().clamp_min(1)[:, None]
    norm = (m_w * m_l).sum(-1) - (m_w * m_w).sum(-1)
    return ches.tolist(), norm.tolist()


def top_share(values: list[float], percent: float) -> set[int]:
    """Indices of the ``percent`` % highest ``values`` (rounded down; ties broken by position)."""
    k = math.floor(len(values) * percent / 100)
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


def filter_by_ches(pairs: pl.DataFrame, by: str, percent: float) -> tuple[pl.DataFrame, dict]:
    """Drop the ``percent`` % training pairs of highest ``by`` (ches or ches_norm); held-out pairs stay, so that
    runs with and without the filter are evaluated on the same pairs. Returns the pairs and what was dropped."""
    train = pairs.filter(pl.col("split") == "train")
    drop = top_share(train[by].to_list(), percent) if percent else set()
    dropped = [train["pair_id"][i] for i in sorted(drop)]
    info = {
        "by": by,
        "top_percent": percent,
        "dropped": len(dropped),
        "threshold": min((train[by][i] for i in drop), default=None),
    }
    return pairs.filter(~pl.col("pair_id").is_in(dropped)), info
