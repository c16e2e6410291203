"""Per-step diagnostics of preference training, from the per-pair tensors of a step's batch.

Log-probs, the margin Δw − Δl, implicit rewards where the loss has them, accuracy, the share of pairs
pushed below the reference (overall and per edit-distance bucket), and gradient magnitudes measured
against the probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.training import losses


def preference_metrics(lp_w, lp_l, ref_w, ref_l, len_w, len_l, beta: tuple[float, float] | None) -> dict[str, float]:
    """Batch means of the per-pair diagnostics. ``delta_margin`` is the unscaled ``Δw − Δl`` whatever the
    loss; ``reward_w``/``reward_l``/``reward_margin`` are the implicit rewards ``β_w·Δw``, ``β_l·Δl`` and
    their difference, logged only when ``beta`` = (β_w, β_l) of the loss (:func:`implicit_beta`).
    ``ref_gap_max``/``ref_gap_mean``: max/mean ``|lp − ref|`` per sequence over both sides (0 up to rounding
    at the first step, where the policy is the reference); ``ref_gap_per_token``: their sum divided by the
    sequences' response tokens, the first-step check's measure (:func:`~pipeline.training.trainer.check_step`);
    ``ref_gap_lp``/``ref_gap_ref``: the sequence with the largest gap (for the check's message, not logged)."""
    d_w, d_l = lp_w - ref_w, lp_l - ref_l
    lp, ref = torch.cat([lp_w, lp_l]), torch.cat([ref_w, ref_l])
    gap = (lp - ref).abs()
    tokens = torch.cat([len_w, len_l]).to(gap.dtype)
    worst = int(gap.argmax())
    out = {
        "lp_w": lp_w.mean().item(),
        "lp_l": lp_l.mean().item(),
        "lp_w_per_token": (lp_w / len_w).mean().item(),
        "lp_l_per_token": (lp_l / len_l).mean().item(),
        "delta_w": d_w.mean().item(),
        "delta_l": d_l.mean().item(),
        "delta_margin": (d_w - d_l).mean().item(),
        "accuracy": (d_w > d_l).float().mean().item(),
        # The failure mode DPO-Positive targets: Pal et al. 2024, "Smaug" (arXiv 2402.13228).
        "displaced_share": (lp_w < ref_w).float().mean().item(),
        "ref_gap_max": gap.max().item(),
        "ref_gap_mean": gap.mean().item(),
        "ref_gap_per_token": (gap.sum() / tokens.sum().clamp_min(1)).item(),
        "ref_gap_lp": lp[worst].item(),
        "ref_gap_ref": ref[worst].item(),
    }
    if beta is not None:
        b_w, b_l = beta
        out.update(
            reward_w=(b_w * d_w).mean().item(),
            reward_l=(b_l * d_l).mean().item(),
            reward_margin=(b_w * d_w - b_l * d_l).mean().item(),
        )
    return out


def _log10_abs(t: torch.Tensor) -> torch.Tensor:
    return torch.log10(t.abs().clamp_min(1e-30))


def gradient_diagnostics(g_w: torch.Tensor, g_l: torch.Tensor, lp_w: torch.Tensor, lp_l: torch.Tensor) -> dict:
    """Gradient magnitudes w.r.t. the probabilities: the "drastic drop" of the rejected likelihood in
    Yan et al. 2024, "3D-Properties: Identifying Challenges in DPO" (arXiv 2406.07327).

    With ``g = ∂L/∂log π``, ``∂L/∂π = g / π``; so
    ``log10 |∂L/∂π(y_l)| / |∂L/∂π(y_w)| = log10|g_l| − log10|g_w| + (lp_w − lp_l) / ln 10``.
    For DPO ``|g_l| = |g_w|`` and the ratio is ``π(y_w)/π(y_l)``. Computed in log space: the
    probabilities of whole sequences underflow.
    """
    ln10 = math.log(10.0)
    log_gw_prob = _log10_abs(g_w) - lp_w / ln10
    log_gl_prob = _log10_abs(g_l) - lp_l / ln10
    return {
        "grad_logp_w": g_w.abs().mean().item(),
        "grad_logp_l": g_l.abs().mean().item(),
        "log10_grad_prob_w": log_gw_prob.mean().item(),
        "log10_grad_prob_l": log_gl_prob.mean().item(),
        "log10_grad_ratio": (log_gl_prob - log_gw_prob).median().item(),
    }


def pair_grad_ratio(terms, lp_w, lp_l, ref_w, ref_l, len_w, len_l) -> torch.Tensor:
    """Per pair, ``log10 |∂ℓ/∂π(y_l)| / |∂ℓ/∂π(y_w)|`` of the pair's own loss ℓ at these log-probs (as in
    :func:`gradient_diagnostics`); NaN where a side's gradient is 0 (e.g. a hinge that no longer binds)."""
    with torch.enable_grad():
        lw, ll = lp_w.detach().clone().requires_grad_(), lp_l.detach().clone().requires_grad_()
        per_pair = losses.combined_loss(terms, lw, ll, ref_w, ref_l, len_w, len_l)
        g_w, g_l = torch.autograd.grad(per_pair.sum(), [lw, ll], allow_unused=True)
    g_w = torch.zeros_like(lw) if g_w is None else g_w
    g_l = torch.zeros_like(ll) if g_l is None else g_l
    ratio = (torch.log10(g_l.abs()) - torch.log10(g_w.abs()) + (lp_w - lp_l) / math.log(10.0)).detach()
    return torch.where((g_w == 0) | (g_l == 0), torch.full_like(ratio, math.nan), ratio)


def bucket_displaced_shares(
    lp_w: torch.Tensor, ref_w: torch.Tensor, order: Sequence[int], buckets: Sequence[str]
) -> dict[str, float]:
    """``displaced_share_<bucket>``: the share of the step's pairs of each bucket with ``lp_w < ref_w``."""
    below = (lp_w < ref_w).tolist()
    out = {}
    for b in sorted({buckets[i] for i in order}):
        sel = [below[j] for j, i in enumerate(order) if buckets[i] == b]
        out[f"displaced_share_{b}"] = sum(sel) / len(sel)
    return out


def implicit_beta(terms) -> tuple[float, float] | None:
    """(β_w, β_l) of the implicit rewards ``β·Δ`` the loss optimises, or None when it has none.

    dpo, cdpo, dpop and dpo_sft reward ``β·Δ`` on both sides, flex_dpo ``β_w·Δw`` and ``β_l·Δl``.
    gamma_dpo and hinge scale ``lp`` and ``ref`` apart (β, γ), ipo has τ, slic and simpo no reference:
    none of them has a ``β·Δ`` reward. A mix of terms has one only if every term has the same.
    """
    keys = {
        "dpo": ("beta", "beta"),
        "cdpo": ("beta", "beta"),
        "dpop": ("beta", "beta"),
        "dpo_sft": ("beta", "beta"),
        "flex_dpo": ("beta_w", "beta_l"),
    }
    betas: set[tuple[float, float]] = set()
    for t in terms:
        name, hp = (t.name, t.hp) if hasattr(t, "hp") else (t[0], t[2])
        if name not in keys:
            return None
        key_w, key_l = keys[name]
        betas.add((float(hp[key_w]), float(hp[key_l])))
    return betas.pop() if len(betas) == 1 else None
