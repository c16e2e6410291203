"""Shared command-line plumbing of the stage modules: arguments and structured logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def stage_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup_logging() -> None:
    level = os.environ.get("DPO_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Third-party chatter (HTTP, file locks) is not what a stage log is for.
    for noisy in ("httpx", "filelock", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
