"""Machine profiles: files of dotted params.yaml keys (``profiles/gpu.yaml``) that one kind of machine
changes, applied to params or turned into ``dvc exp run`` arguments.

    dvc exp run $(python -m pipeline.profiles profiles/gpu.yaml)

A profile names existing keys only, so a typo fails instead of adding a setting nothing reads, and
everything it does not name stays as params.yaml has it.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

import yaml


def load_profile(path: str | Path) -> dict:
    """The profile's ``dotted.key: value`` mapping."""
    profile = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"{path}: a profile is a mapping of dotted params.yaml keys to values")
    return profile


def apply_profile(params: dict, profile: dict) -> dict:
    """A copy of ``params`` with each dotted key of ``profile`` set (every key must already exist)."""
    params = copy.deepcopy(params)
    for dotted, value in profile.items():
        node = params
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        if last not in node:
            raise KeyError(f"profile key {dotted!r} is not in params.yaml")
        node[last] = value
    return params


def profile_args(profile: dict) -> list[str]:
    """``-S key=value`` arguments of ``dvc exp run``, shell-quoted, each value in YAML's flow style
    (how DVC parses it)."""

    def flow(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()

    return [arg for key, value in profile.items() for arg in ("-S", shlex.quote(f"{key}={flow(value)}"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a profile file, e.g. profiles/gpu.yaml")
    args = parser.parse_args(argv)
    print(" ".join(profile_args(load_profile(args.profile))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
