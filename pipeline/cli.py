"""Shared command-line plumbing of the stage modules: arguments, structured logging, exit on bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pipeline.stage")


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every stage takes (``--params``); a stage adds its own (``--variant``, ``--source``)."""
    first = (description or "").strip().splitlines()
    p = argparse.ArgumentParser(description=first[0] if first else None)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup_logging() -> None:
    level = os.environ.get("DPO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Third-party chatter (HTTP, file locks) is not what a stage log is for.
    for noisy in ("httpx", "filelock", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(main: Callable[[], Any]) -> None:
    """Run a stage's ``main`` as a program: logging set up, and bad input (a ``ValueError`` such as
    ``ConfigError`` or a prompt file error, whose message names the file, row and field or the key)
    reported in one line with exit status 1 instead of a traceback (``DPO_LOG_LEVEL=DEBUG`` shows it)."""
    setup_logging()
    try:
        main()
    except ValueError as e:
        log.debug("traceback", exc_info=True)
        log.error("%s", e)
        sys.exit(1)
