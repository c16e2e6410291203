"""Loading and validating ``params.yaml``: the base of every settings model and the one error type.

``params.yaml`` is the single source of every setting: no field has a default (a missing key is an error
that names it) and no module repeats a value that the file sets. Any problem raises :class:`ConfigError`
whose message names the file and the key, e.g. ``params.yaml: train.variants.dpo.beta: Input should be a
valid number``. This module imports pydantic and yaml only, never torch, so a stage loads its settings in
milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, PrivateAttr, ValidationError
from typing_extensions import Self

DEFAULT_PARAMS = "params.yaml"

# Every top-level section of params.yaml; a stage validates only the sections it reads, so an unknown
# (mistyped) section is caught here instead of being silently ignored.
SECTIONS = (
    "prepare",
    "policy",
    "sample",
    "sample_other",
    "vllm",
    "judge",
    "pairs",
    "reference",
    "train",
    "evaluate",
    "report",
    "toy",
    "flows",
)


class ConfigError(ValueError):
    """A bad setting in params.yaml; the message names the key."""


def _no_repeats(values: list) -> list:
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} listed more than once")
    return values


T = TypeVar("T")
# A list whose values must differ (seeds, scenarios, losses, ...): the error names the repeated values.
Unique = Annotated[list[T], AfterValidator(_no_repeats)]


class Strict(BaseModel):
    """A settings model: unknown keys are errors, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def error_text(err: Mapping[str, Any], prefix: str = "") -> str:
    """One pydantic error as ``<key>: <message> (got <value>)``; a :class:`ConfigError` raised inside a
    validator already names its key and is passed through."""
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)
    key = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]])
    value = err.get("input")
    # A type error echoes the value; a validator's own message already says what is wrong with it.
    echo = "input" in err and err["type"] != "value_error" and not isinstance(value, (dict, list))
    got = f" (got {value!r})" if echo else ""
    message = err["msg"].removeprefix("Value error, ")
    return f"{key}: {message}{got}" if key else f"{message}{got}"


def validate(model: type[BaseModel], raw: Any, source: str, prefix: str = "") -> Any:
    """``model(**raw)``, with a :class:`ConfigError` naming ``source`` and the first bad key."""
    if not isinstance(raw, Mapping):
        where = prefix or "top level"
        raise ConfigError(f"{source}: {where}: must be a mapping, got {type(raw).__name__}")
    try:
        return model(**raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {error_text(e.errors()[0], prefix)}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed YAML mapping of a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


class StageParams(Strict):
    """The sections of params.yaml that one stage reads: a subclass declares them as fields (and inherits
    the cross-section checks of the views it combines). Sections it does not declare are not validated by
    it, so its DVC code deps hold the settings it reads and no others."""

    _source: str = PrivateAttr(default=DEFAULT_PARAMS)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], source: str = DEFAULT_PARAMS) -> Self:
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: {unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
        sections = {k: v for k, v in raw.items() if k in cls.model_fields}
        params = validate(cls, sections, source)
        params._source = source
        return params

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_PARAMS) -> Self:
        return cls.parse(read_params_file(path), str(path))

    @property
    def source(self) -> str:
        """The params file these settings came from, for error messages."""
        return self._source


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in key by key (nested mappings merged, the rest replaced)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
