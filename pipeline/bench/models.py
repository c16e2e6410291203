"""The model a benchmark runs: the pipeline's own policy when there is one, else params.yaml's starting
model, or a tiny random model for a quick run."""

from __future__ import annotations

from pathlib import Path

from pipeline import paths
from pipeline.model import loading
from pipeline.settings.params import Params


def has_policy() -> bool:
    """Whether the policy stage's output (the model the pipeline samples from, trains and takes the
    reference log-probs of) is in the current directory."""
    return (Path(paths.POLICY_DIR) / "config.json").is_file()


def bench_model(cfg: Params, requested: str | None, *, quick: bool, workdir: Path) -> str:
    """The folder of the model to benchmark.

    ``requested`` (a builtin name, model folder or ``hf:<id>``) when given; else the policy folder
    (``models/policy``), so that a benchmark measures the model the stages run; else, for a quick run,
    a tiny random model with the tokenizer of ``policy.model``, written under ``workdir``; else
    ``policy.model`` itself (the starting model before the SFT warm-up)."""
    if requested:
        return loading.resolve(requested)
    if has_policy():
        return paths.POLICY_DIR
    if quick:
        return str(loading.make_tiny_model(workdir / "tiny-model", loading.resolve(cfg.policy.model)))
    return loading.resolve(cfg.policy.model)
