"""Each loss's hyperparameters and their allowed ranges: the typed configuration of
:mod:`pipeline.training.losses`, whose registry binds each name to its function (a test checks that both
agree). Kept apart from the loss functions, free of torch, so that params.yaml is validated before any
stage loads a model."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


class LossConfigError(ValueError):
    """A bad loss name or hyperparameter. ``.key`` names the hyperparameter (None: the loss name)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# (low, low inclusive, high exclusive)
_POSITIVE = (0.0, False, math.inf)  # > 0
_NONNEG = (0.0, True, math.inf)  # >= 0
_SMOOTHING = (0.0, True, 0.5)  # [0, 0.5)

LOSS_HPARAMS: dict[str, dict[str, tuple[float, bool, float]]] = {
    "dpo": {"beta": _POSITIVE},
    "cdpo": {"beta": _POSITIVE, "label_smoothing": _SMOOTHING},
    "dpop": {"beta": _POSITIVE, "dpop_lambda": _NONNEG},
    "ipo": {"tau": _POSITIVE},
    "slic": {"delta": _NONNEG, "reg_weight": _NONNEG},
    "flex_dpo": {"beta_w": _POSITIVE, "beta_l": _POSITIVE},
    "dpo_sft": {"beta": _POSITIVE, "sft_weight": _NONNEG},
    "gamma_dpo": {"beta": _POSITIVE, "gamma": _NONNEG},
    "hinge": {"beta": _POSITIVE, "gamma": _NONNEG},
    "simpo": {"beta": _POSITIVE, "margin": _NONNEG},
}
LOSS_NAMES: tuple[str, ...] = tuple(LOSS_HPARAMS)


def _range_text(rng: tuple[float, bool, float]) -> str:
    low, inclusive, high = rng
    if high == math.inf:
        return f"{'>=' if inclusive else '>'} {low:g}"
    return f"in [{low:g}, {high:g})"


def _checked_value(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LossConfigError(
            f"hyperparameter {key!r} of loss '{name}' must be a number, got {value!r} ({type(value).__name__})", key=key
        )
    value = float(value)
    rng = LOSS_HPARAMS[name][key]
    low, inclusive, high = rng
    if not (math.isfinite(value) and (value >= low if inclusive else value > low) and value < high):
        raise LossConfigError(
            f"hyperparameter {key!r} of loss '{name}' must be {_range_text(rng)}, got {value:g}", key=key
        )
    return value


def validate_loss_hparams(name: Any, hp: Mapping[str, Any]) -> dict[str, float]:
    """Check the hyperparameters of loss ``name``; return them as floats.

    Raises :class:`LossConfigError` for an unknown loss (``key=None``), an unknown, missing,
    non-numeric (bools included) or out-of-range hyperparameter (``key`` = that hyperparameter).
    Hyperparameters have no defaults: every one must be given.
    """
    if not isinstance(name, str) or name not in LOSS_HPARAMS:
        raise LossConfigError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}", key=None)
    if not isinstance(hp, Mapping):
        raise LossConfigError(f"loss '{name}': hyperparameters must be a mapping, got {type(hp).__name__}")
    allowed = LOSS_HPARAMS[name]
    for key in hp:
        if key not in allowed:
            raise LossConfigError(
                f"unknown hyperparameter {key!r} for loss '{name}' (expected: {', '.join(allowed)})", key=str(key)
            )
    missing = [key for key in allowed if key not in hp]
    if missing:
        raise LossConfigError(
            f"missing hyperparameter {missing[0]!r} for loss '{name}' (required: {', '.join(allowed)})", key=missing[0]
        )
    return {key: _checked_value(name, key, hp[key]) for key in allowed}
