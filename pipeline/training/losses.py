"""The DPO family of preference losses, over per-sequence summed log-probabilities.

Every loss here takes 1-D float tensors of shape ``[B]``:

- ``lp_w``, ``lp_l``: ``log πθ(y_w|x)``, ``log πθ(y_l|x)`` under the policy (response tokens only);
- ``ref_w``, ``ref_l``: the same under the frozen reference model (ignored by reference-free losses);
- ``len_w``, ``len_l``: response lengths in tokens (only the losses that normalise by length).

and returns the PER-PAIR loss (shape ``[B]``); the batch loss is its mean. Write
``Δw = lp_w − ref_w`` and ``Δl = lp_l − ref_l``. The formulas and their papers are listed in ``docs/losses.md``.

Public API: :data:`LOSSES` (the registry), :data:`LOSS_NAMES`, :func:`preference_loss`,
:func:`combined_loss`, :func:`validate_hparams`, :func:`needs_reference`, :func:`needs_lengths`
and :class:`LossConfigError`. Hyperparameters have no defaults: every one must be given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid

from pipeline.training.loss_hparams import LOSS_HPARAMS, LOSS_NAMES, LossConfigError
from pipeline.training.loss_hparams import validate_loss_hparams as validate_hparams

__all__ = [
    "LOSSES",
    "LOSS_NAMES",
    "LossConfigError",
    "LossSpec",
    "combined_loss",
    "needs_lengths",
    "needs_reference",
    "preference_loss",
    "validate_hparams",
]


# --------------------------------------------------------------------------------------------- losses
def dpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, beta: float) -> Tensor:
    """DPO: ``−log σ(β (Δw − Δl))``.

    Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290.
    """
    return -logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))


def cdpo(
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    len_w=None,
    len_l=None,
    *,
    beta: float,
    label_smoothing: float,
) -> Tensor:
    """Conservative DPO (label smoothing ε): ``−(1−ε) log σ(β d) − ε log σ(−β d)``, ``d = Δw − Δl``.

    Mitchell 2023, "A note on DPO with noisy preferences" (cDPO, a technical note); ε = 0 is DPO.
    """
    z = beta * ((lp_w - ref_w) - (lp_l - ref_l))
    return -(1.0 - label_smoothing) * logsigmoid(z) - label_smoothing * logsigmoid(-z)


def dpop(
    lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, beta: float, dpop_lambda: float
) -> Tensor:
    """DPO-Positive: ``−log σ(β (Δw − Δl − λ·max(0, ref_w − lp_w)))``.

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"
    (arXiv 2402.13228). The penalty is exactly zero while ``lp_w ≥ ref_w``; the paper uses λ ∈ {5, 50, 500}.
    """
    penalty = torch.clamp(ref_w - lp_w, min=0.0)
    return -logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l) - dpop_lambda * penalty))


def ipo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, tau: float) -> Tensor:
    """IPO: ``(Δw − Δl − 1/(2τ))²`` (τ plays β's role).

    Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv 2310.12036; as in Yan et al. 2024 (arXiv 2406.07327) §B.3.1.
    """
    return ((lp_w - ref_w) - (lp_l - ref_l) - 1.0 / (2.0 * tau)) ** 2


def slic(
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor | None = None,
    ref_l: Tensor | None = None,
    len_w=None,
    len_l=None,
    *,
    delta: float,
    reg_weight: float,
) -> Tensor:
    """SLiC-HF: ``max(0, δ − (lp_w − lp_l)) − λ_reg · lp_w`` (reference-free).

    Rank calibration plus the NLL of the chosen response as the regulariser. Zhao et al. 2023,
    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv 2305.10425; as in Yan et al.
    2024 (arXiv 2406.07327) §B.3.2.
    """
    return torch.clamp(delta - (lp_w - lp_l), min=0.0) - reg_weight * lp_w


def flex_dpo(
    lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, beta_w: float, beta_l: float
) -> Tensor:
    """Flexible-β DPO: ``−log σ(β_w Δw − β_l Δl)``; a lower β_l slows the drop of ``lp_l``.

    Yan et al. 2024, "3D-Properties: Identifying Challenges in DPO and Charting a Path Forward", arXiv 2406.07327,
    §3.3 and §B.2.1; β_w = β_l = β is DPO.
    """
    return -logsigmoid(beta_w * (lp_w - ref_w) - beta_l * (lp_l - ref_l))


def dpo_sft(
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    len_w: Tensor | None = None,
    len_l: Tensor | None = None,
    *,
    beta: float,
    sft_weight: float,
) -> Tensor:
    """DPO plus an SFT term on the chosen response: ``dpo + α · (−lp_w / |y_w|)``.

    Yan et al. 2024 (arXiv 2406.07327) §3.3 and §B.2.2 (α = ``sft_weight``; the SFT term is the
    per-token NLL).
    """
    len_w, len_l = _need_lengths("dpo_sft", len_w, len_l)
    return dpo(lp_w, lp_l, ref_w, ref_l, beta=beta) + sft_weight * (-lp_w / len_w)


def gamma_dpo(
    lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, beta: float, gamma: float
) -> Tensor:
    """DPO with a separate reference scale: ``−log σ(β (lp_w − lp_l) − γ (ref_w − ref_l))``.

    Kyunghyun Cho, "Continued musing on DPO" (blog post, 2024): γ = β is DPO, γ = 0 ignores the reference.
    """
    return -logsigmoid(beta * (lp_w - lp_l) - gamma * (ref_w - ref_l))


def hinge(
    lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *, beta: float, gamma: float
) -> Tensor:
    """Margin (hinge) form of gamma_dpo: ``max(0, γ (ref_w − ref_l) − β (lp_w − lp_l))``.

    Kyunghyun Cho, "Continued musing on DPO" (blog post, 2024): zero once ``lp_w − lp_l ≥ (γ/β)(ref_w − ref_l)``.
    """
    return torch.clamp(gamma * (ref_w - ref_l) - beta * (lp_w - lp_l), min=0.0)


def simpo(
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor | None = None,
    ref_l: Tensor | None = None,
    len_w: Tensor | None = None,
    len_l: Tensor | None = None,
    *,
    beta: float,
    margin: float,
) -> Tensor:
    """SimPO: ``−log σ(β (lp_w/|y_w| − lp_l/|y_l|) − γ_margin)`` (reference-free, length-normalised).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv 2405.14734.
    """
    len_w, len_l = _need_lengths("simpo", len_w, len_l)
    return -logsigmoid(beta * (lp_w / len_w - lp_l / len_l) - margin)


def _need_lengths(name: str, len_w: Tensor | None, len_l: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(len_w, len_l)`` for loss ``name``, which normalises by them; a ValueError when one is missing."""
    if len_w is None or len_l is None:
        raise ValueError(
            f"loss '{name}' normalises by response length: pass len_w and len_l "
            "(number of response tokens of the chosen and rejected responses)"
        )
    return len_w, len_l


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class LossSpec:
    """One registered loss: its function, hyperparameters (name -> allowed range) and inputs."""

    fn: Callable[..., Tensor]
    hparams: Mapping[str, tuple[float, bool, float]]
    uses_reference: bool = True
    uses_lengths: bool = False

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


def _spec(fn: Callable[..., Tensor], uses_reference: bool = True, uses_lengths: bool = False) -> LossSpec:
    # The hyperparameters and their ranges are typed configuration (pipeline.training.loss_hparams),
    # validated when params.yaml is loaded; a test checks they match each function's keywords.
    return LossSpec(fn, LOSS_HPARAMS[fn.__name__], uses_reference, uses_lengths)


LOSSES: dict[str, LossSpec] = {
    spec.fn.__name__: spec
    for spec in (
        _spec(dpo),
        _spec(cdpo),
        _spec(dpop),
        _spec(ipo),
        _spec(slic, uses_reference=False),
        _spec(flex_dpo),
        _spec(dpo_sft, uses_lengths=True),
        _spec(gamma_dpo),
        _spec(hinge),
        _spec(simpo, uses_reference=False, uses_lengths=True),
    )
}


def _lookup(name: Any) -> LossSpec:
    if not isinstance(name, str) or name not in LOSSES:
        raise LossConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}", key=None)
    return LOSSES[name]


def needs_reference(name: str) -> bool:
    """True when the loss reads the reference log-probs (``ref_w``, ``ref_l``)."""
    return _lookup(name).uses_reference


def needs_lengths(name: str) -> bool:
    """True when the loss normalises by response length (``len_w``, ``len_l`` required)."""
    return _lookup(name).uses_lengths


# --------------------------------------------------------------------------------------------- entry points
def preference_loss(
    name: str,
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor | None,
    ref_l: Tensor | None,
    len_w: Tensor | None = None,
    len_l: Tensor | None = None,
    **hp: Any,
) -> Tensor:
    """Per-pair loss (shape ``[B]``) of loss ``name`` with hyperparameters ``hp`` (validated)."""
    spec = _lookup(name)
    params = validate_hparams(name, hp)
    if spec.uses_reference and (ref_w is None or ref_l is None):
        raise ValueError(f"loss '{name}' needs the reference log-probs ref_w and ref_l")
    if spec.uses_lengths:
        _need_lengths(name, len_w, len_l)
    return spec.fn(lp_w, lp_l, ref_w, ref_l, len_w, len_l, **params)


def _unpack_term(term: Any) -> tuple[str, float, Mapping[str, Any]]:
    if all(hasattr(term, a) for a in ("name", "weight", "hp")):
        return term.name, term.weight, term.hp
    if isinstance(term, (tuple, list)) and len(term) == 3:
        return term[0], term[1], term[2]
    raise TypeError(f"a loss term must have .name .weight .hp or be a (name, weight, hp) tuple, got {term!r}")


def combined_loss(
    terms: Iterable[Any],
    lp_w: Tensor,
    lp_l: Tensor,
    ref_w: Tensor | None,
    ref_l: Tensor | None,
    len_w: Tensor | None = None,
    len_l: Tensor | None = None,
) -> Tensor:
    """Per-pair weighted sum ``Σ weight · preference_loss(name, …, **hp)`` over ``terms``.

    Each term is an object with ``.name .weight .hp`` or a tuple ``(name, weight, hp)``.
    """
    total: Tensor | None = None
    for term in terms:
        name, weight, hp = _unpack_term(term)
        part = float(weight) * preference_loss(name, lp_w, lp_l, ref_w, ref_l, len_w, len_l, **dict(hp))
        total = part if total is None else total + part
    if total is None:
        raise ValueError("combined_loss: no loss terms given")
    return total
