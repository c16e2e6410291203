"""Evaluate an expression in a fresh Python process with a chosen hash seed.

Values that other processes must reproduce (per-request sampling seeds, cache keys) are only shown stable
by computing them in another interpreter: the same call twice in one process agrees even when it depends
on ``hash()``, whose salt ``PYTHONHASHSEED`` changes from process to process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[1]


def value_in_fresh_process(imports: str, expression: str, hash_seed: int) -> Any:
    """``expression`` (JSON-serialisable) evaluated after ``imports`` in a new interpreter.

    The project's checkout comes first on the path, so the code under test is this checkout's even where
    the environment has the package installed from another one."""
    env = {
        **os.environ,
        "PYTHONHASHSEED": str(hash_seed),
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", f"import json\n{imports}\nprint(json.dumps({expression}))"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)
