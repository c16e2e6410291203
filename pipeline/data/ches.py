"""CHES, the centered hidden embedding similarity of a pair (Razin et al., ICLR 2025, "Unintentional
Unalignment: Likelihood Displacement in Direct Preference Optimization", arXiv 2410.08847).

With ``h_y`` the sum over a response's tokens of the starting policy's last-layer hidden state at the
position that predicts each token (:func:`pipeline.model.logprobs.response_logprobs_and_hidden`)::

    CHES(x, y_w, y_l)      = <h_w, h_l> - ||h_w||^2
    CHES_norm(x, y_w, y_l) = <h_w/|y_w|, h_l/|y_l|> - ||h_w/|y_w|||^2

Higher: the rejected response pulls the chosen one down more (the paper's predictor of likelihood
displacement; its mitigation drops the pairs with the highest CHES before training).
"""

from __future__ import annotations

import math

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
