"""Where stages read and write, and where caches live: the one place a path is spelled in code
(dvc.yaml repeats them, as DVC needs).

Standard library only: imported by every stage and by light modules.
"""

from __future__ import annotations

import os
from pathlib import Path

PROMPTS = "data/prompts.parquet"
QUARANTINE = "data/quarantine.jsonl"
POLICY_DIR = "models/policy"
POLICY_GENERATIONS = "data/policy/generations.parquet"
CANDIDATES = "data/candidates.parquet"
CANDIDATES_OTHER = "data/candidates_other.parquet"
SCORES = "data/judge/scores.parquet"
SELECTIONS = "data/judge/selections.parquet"
PAIRS = "data/pairs.parquet"
PAIRS_TRL = "data/pairs_trl"  # the pairs in TRL's format: {jsonl,parquet}/{train,test}.*
PAIRS_QUARANTINE = "data/pairs_quarantine.jsonl"  # an imported pairs file's quarantined rows
REFERENCE = "data/reference.parquet"
JUDGEMENTS = "data/judge/llm_judgements.jsonl"
METRICS = "metrics"
REPORT_DIR = "reports/main"
FINDINGS = "reports/findings.json"  # the report's findings, tracked by git: docs/results.md is generated from it
TOY_HISTORY = "data/toy/history.parquet"
TOY_REPORTS = "reports/toy"


def model_dir(variant: str) -> str:
    return f"models/{variant}"


def export_dir(variant: str) -> str:
    """The shareable Hugging Face folder of ``export@<variant>``: the model with its completed card."""
    return f"export/models/{variant}"


def live_dir(variant: str) -> str:
    return f"dvclive/train/{variant}"


def train_dir(variant: str) -> str:
    """The train stage's tables besides the model: the fixed-set and probe curves."""
    return f"data/train/{variant}"


def fixed_curves(variant: str) -> str:
    return f"{train_dir(variant)}/fixed_curves.parquet"


def probe_curves(variant: str) -> str:
    return f"{train_dir(variant)}/probe_curves.parquet"


def eval_table(variant: str) -> str:
    return f"data/eval/{variant}/pairs.parquet"


def eval_generations(variant: str) -> str:
    return f"data/eval/{variant}/generations.parquet"


def eval_val_generations(variant: str) -> str:
    """Greedy answers on the validation prompts (``prepare.n_val`` > 0 only)."""
    return f"data/eval/{variant}/val_generations.parquet"


def metrics_file(stage: str) -> str:
    return f"{METRICS}/{stage}.json"


def eval_metrics(variant: str) -> str:
    """The metrics of ``evaluate@<variant>`` (read by the report and the flows)."""
    return metrics_file(f"eval/{variant}")


def candidates(source: str) -> str:
    """The policy's candidates, or another model's (scenarios 3 and 4)."""
    return {"policy": CANDIDATES, "other": CANDIDATES_OTHER}[source]


# --------------------------------------------------------------------------------------------- caches
def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The directory a relative cache path is taken from: the current directory (DVC runs stages at the
    repository root), except inside a ``dvc exp`` temporary workspace (``<repo>/.dvc/tmp/exps/...``),
    which is mapped back to ``<repo>`` so that experiments share the main repository's caches."""
    cwd = Path(start or os.getcwd()).resolve()
    for p in (cwd, *cwd.parents):
        if p.name == "exps" and p.parent.name == "tmp" and p.parent.parent.name == ".dvc":
            return p.parent.parent.parent
    return cwd


def resolve_cache_dir(
    configured: str | os.PathLike, *, env_var: str | None, start: str | os.PathLike | None = None
) -> Path:
    """``$<env_var>`` if that variable is set, else ``configured`` (absolute as is, relative to
    :func:`repo_root`). Each cache names its own variable (the judge's: ``pipeline.judging.cache.CACHE_ENV``),
    or None for a cache that only follows its configured path."""
    env = os.environ.get(env_var) if env_var else None
    path = Path(env or configured).expanduser()
    return path if path.is_absolute() else repo_root(start) / path
