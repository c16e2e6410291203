"""The DPO family of preference losses, over per-sequence summed log-probabilities.

Every loss here takes 1-D float tensors of shape ``[B]``:

- ``lp_w``, ``lp_l``: ``log πθ(y_w|x)``, ``log πθ(y_l|x)`` under the policy (response tokens only);
- ``ref_w``, ``ref_l``: the same under the frozen reference model (ignored by reference-free losses);
- ``len_w``, ``len_l``: response lengths in tokens (only the losses that normalise by length).

and returns the PER-PAIR loss (shape ``[B]``); the batch loss is its mean. Write
``Δw = lp_w − ref_w`` and ``Δl = lp_l − ref_l``. The formulas follow ``shared/REFERENCE.md``.

Public API: :data:`LOSSES` (the registry), :data:`LOSS_NAMES`, :func:`preference_loss`,
:func:`combined_loss`, :func:`validate_hparams`, :func:`needs_reference`, :func:`needs_lengths`
and :class:`LossConfigError`. Hyperparameters have no defaults: every one must be given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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


class LossConfigError(ValueError):
    """A bad loss name or hyperparameter. ``.key`` names the hyperparameter (None: the loss name)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------------------------- losses
def dpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
        beta: float) -> Tensor:
    """DPO: ``−log σ(β (Δw − Δl))``. Rafailov et al. 2023, "Direct Preference Optimization"."""
    return -F.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l)))


def cdpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
         beta: float, label_smoothing: float) -> Tensor:
    """Conservative DPO (label smoothing ε): ``−(1−ε) log σ(β d) − ε log σ(−β d)``, ``d = Δw − Δl``.

    Mitchell 2023, "A note on DPO with noisy preferences" (cDPO); ε = 0 is DPO.
    """
    z = beta * ((lp_w - ref_w) - (lp_l - ref_l))
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpop(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
         beta: float, dpop_lambda: float) -> Tensor:
    """DPO-Positive: ``−log σ(β (Δw − Δl − λ·max(0, ref_w − lp_w)))``.

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"
    (seed 000). The penalty is exactly zero while ``lp_w ≥ ref_w``; the paper uses λ ∈ {5, 50, 500}.
    """
    penalty = torch.clamp(ref_w - lp_w, min=0.0)
    return -F.logsigmoid(beta * ((lp_w - ref_w) - (lp_l - ref_l) - dpop_lambda * penalty))


def ipo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
        tau: float) -> Tensor:
    """IPO: ``(Δw − Δl − 1/(2τ))²`` (τ plays β's role).

    Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences"; seed 001 §B.3.1.
    """
    return ((lp_w - ref_w) - (lp_l - ref_l) - 1.0 / (2.0 * tau)) ** 2


def slic(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None,
         len_w=None, len_l=None, *, delta: float, reg_weight: float) -> Tensor:
    """SLiC-HF: ``max(0, δ − (lp_w − lp_l)) − λ_reg · lp_w`` (reference-free).

    Rank calibration plus the NLL of the chosen response as the regulariser. Zhao et al. 2023,
    "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"; seed 001 §B.3.2.
    """
    return torch.clamp(delta - (lp_w - lp_l), min=0.0) - reg_weight * lp_w


def flex_dpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
             beta_w: float, beta_l: float) -> Tensor:
    """Flexible-β DPO: ``−log σ(β_w Δw − β_l Δl)``; a lower β_l slows the drop of ``lp_l``.

    Seed 001 (3D-properties of DPO) §3.3 and §B.2.1; β_w = β_l = β is DPO.
    """
    return -F.logsigmoid(beta_w * (lp_w - ref_w) - beta_l * (lp_l - ref_l))


def dpo_sft(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w: Tensor | None = None,
            len_l: Tensor | None = None, *, beta: float, sft_weight: float) -> Tensor:
    """DPO plus an SFT term on the chosen response: ``dpo + α · (−lp_w / |y_w|)``.

    Seed 001 §3.3 and §B.2.2 (α = ``sft_weight``; the SFT term is the per-token NLL).
    """
    _need_lengths("dpo_sft", len_w, len_l)
    return dpo(lp_w, lp_l, ref_w, ref_l, beta=beta) + sft_weight * (-lp_w / len_w)


def gamma_dpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
              beta: float, gamma: float) -> Tensor:
    """DPO with a separate reference scale: ``−log σ(β (lp_w − lp_l) − γ (ref_w − ref_l))``.

    Seed 002 (Cho, "Continued musing on DPO"): γ = β is DPO, γ = 0 ignores the reference.
    """
    return -F.logsigmoid(beta * (lp_w - lp_l) - gamma * (ref_w - ref_l))


def hinge(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor, ref_l: Tensor, len_w=None, len_l=None, *,
          beta: float, gamma: float) -> Tensor:
    """Margin (hinge) form of gamma_dpo: ``max(0, γ (ref_w − ref_l) − β (lp_w − lp_l))``.

    Seed 002: zero once ``lp_w − lp_l ≥ (γ/β)(ref_w − ref_l)``.
    """
    return torch.clamp(gamma * (ref_w - ref_l) - beta * (lp_w - lp_l), min=0.0)


def simpo(lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None = None, ref_l: Tensor | None = None,
          len_w: Tensor | None = None, len_l: Tensor | None = None, *, beta: float,
          margin: float) -> Tensor:
    """SimPO: ``−log σ(β (lp_w/|y_w| − lp_l/|y_l|) − γ_margin)`` (reference-free, length-normalised).

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"; seed 002.
    """
    _need_lengths("simpo", len_w, len_l)
    return -F.logsigmoid(beta * (lp_w / len_w - lp_l / len_l) - margin)


def _need_lengths(name: str, len_w: Any, len_l: Any) -> None:
    if len_w is None or len_l is None:
        raise ValueError(f"loss '{name}' normalises by response length: pass len_w and len_l "
                         "(number of response tokens of the chosen and rejected responses)")


# --------------------------------------------------------------------------------------------- registry
_POSITIVE = (0.0, False, math.inf)  # (low, low inclusive, high): > 0
_NONNEG = (0.0, True, math.inf)  # >= 0
_SMOOTHING = (0.0, True, 0.5)  # [0, 0.5)


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


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, {"beta": _POSITIVE}),
    "cdpo": LossSpec(cdpo, {"beta": _POSITIVE, "label_smoothing": _SMOOTHING}),
    "dpop": LossSpec(dpop, {"beta": _POSITIVE, "dpop_lambda": _NONNEG}),
    "ipo": LossSpec(ipo, {"tau": _POSITIVE}),
    "slic": LossSpec(slic, {"delta": _NONNEG, "reg_weight": _NONNEG}, uses_reference=False),
    "flex_dpo": LossSpec(flex_dpo, {"beta_w": _POSITIVE, "beta_l": _POSITIVE}),
    "dpo_sft": LossSpec(dpo_sft, {"beta": _POSITIVE, "sft_weight": _NONNEG}, uses_lengths=True),
    "gamma_dpo": LossSpec(gamma_dpo, {"beta": _POSITIVE, "gamma": _NONNEG}),
    "hinge": LossSpec(hinge, {"beta": _POSITIVE, "gamma": _NONNEG}),
    "simpo": LossSpec(simpo, {"beta": _POSITIVE, "margin": _NONNEG}, uses_reference=False,
                      uses_lengths=True),
}

LOSS_NAMES: tuple[str, ...] = tuple(LOSSES)


def _spec(name: Any) -> LossSpec:
    if not isinstance(name, str) or name not in LOSSES:
        raise LossConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}", key=None)
    return LOSSES[name]


def needs_reference(name: str) -> bool:
    """True when the loss reads the reference log-probs (``ref_w``, ``ref_l``)."""
    return _spec(name).uses_reference


def needs_lengths(name: str) -> bool:
    """True when the loss normalises by response length (``len_w``, ``len_l`` required)."""
    return _spec(name).uses_lengths


def _range_text(rng: tuple[float, bool, float]) -> str:
    low, inclusive, high = rng
    if high == math.inf:
        return f"{'>=' if inclusive else '>'} {low:g}"
    return f"in [{low:g}, {high:g})"


def validate_hparams(name: str, hp: Mapping[str, Any]) -> dict[str, float]:
    """Check the hyperparameters of loss ``name``; return them as floats.

    Raises :class:`LossConfigError` for an unknown loss (``key=None``), an unknown, missing,
    non-numeric (bools included) or out-of-range hyperparameter (``key`` = that hyperparameter).
    """
    spec = _spec(name)
    if not isinstance(hp, Mapping):
        raise LossConfigError(f"loss '{name}': hyperparameters must be a mapping, got {type(hp).__name__}")
    allowed = spec.hparams
    for key in hp:
        if key not in allowed:
            raise LossConfigError(f"unknown hyperparameter {key!r} for loss '{name}' "
                                  f"(expected: {', '.join(allowed)})", key=str(key))
    out: dict[str, float] = {}
    for key, rng in allowed.items():
        if key not in hp:
            raise LossConfigError(f"missing hyperparameter {key!r} for loss '{name}' "
                                  f"(required: {', '.join(allowed)})", key=key)
        value = hp[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LossConfigError(f"hyperparameter {key!r} of loss '{name}' must be a number, "
                                  f"got {value!r} ({type(value).__name__})", key=key)
        value = float(value)
        low, inclusive, high = rng
        ok = math.isfinite(value) and (value >= low if inclusive else value > low) and value < high
        if not ok:
            raise LossConfigError(f"hyperparameter {key!r} of loss '{name}' must be {_range_text(rng)}, "
                                  f"got {value:g}", key=key)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- entry points
def preference_loss(name: str, lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None, ref_l: Tensor | None,
                    len_w: Tensor | None = None, len_l: Tensor | None = None, **hp: Any) -> Tensor:
    """Per-pair loss (shape ``[B]``) of loss ``name`` with hyperparameters ``hp`` (validated)."""
    spec = _spec(name)
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


def combined_loss(terms: Iterable[Any], lp_w: Tensor, lp_l: Tensor, ref_w: Tensor | None,
                  ref_l: Tensor | None, len_w: Tensor | None = None, len_l: Tensor | None = None) -> Tensor:
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
