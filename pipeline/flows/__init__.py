"""Prefect flows over the DVC stages: scheduled runs, sweeps, on-policy rounds, GPU-cluster deployment.

DVC keeps owning the caching: every stage task is ``dvc repro --single-item <stage>``, so a flow never
recomputes what ``dvc repro`` would skip (a stage whose deps and params are unchanged is skipped, one
DVC has run before with the same inputs is restored from its run-cache). Prefect adds schedules,
per-stage retries and timeouts, the stage logs in the run log, and artifacts.

- :func:`pipeline_flow` (:mod:`.run`): one task per DVC stage in ``dvc dag`` order; parameters are
  param overrides (``{"train.variants.dpo.beta": 0.3}``, the ``dvc exp run -S`` grammar); a run with
  overrides is recorded as a DVC experiment (``dvc exp show``, ``dvc exp apply <name>``).
- :func:`sweep_flow` (:mod:`.sweep`): a grid of params, one ``dvc exp run --temp`` experiment per
  point, at most ``max_parallel`` at once; ends with a comparison table artifact.
- :func:`scenarios_flow` (:mod:`.scenarios`): the data scenarios of the 3D-properties paper
  (arXiv:2406.07327; ``pairs.scenario`` 1-4) for one loss, one experiment each (the sweep
  machinery), compared side by side in ``reports/scenarios_side_by_side.md`` (one seed; the study with
  ``scenarios`` gives the same experiments over seeds with their tests).
- :func:`study_flow` (:mod:`.study`): training seeds × variants × pair sets, one experiment per seed
  and pair set (the sweep machinery), reported in ``reports/study/`` with mean ± sd across seeds,
  pooled per-pair intervals and tests, and one row per claim it can judge (docs/losses.md).
- :func:`tuning_flow` (:mod:`.tuning`): the study's tuning mode: each loss over a grid, selected on
  validation prompts, the selected settings over seeds, reported in ``reports/tuning/``.
- :func:`rounds_flow` (:mod:`.rounds`): iterative (on-policy) DPO: round r > 1 starts from round
  r-1's trained model.
- :func:`cluster_flow` (:mod:`.cluster`): the pipeline split into CPU and GPU segments, each run by
  its own deployment; :func:`kubernetes_job_template` for their work pool.

Underneath, without Prefect: :mod:`.dvc_process` (DVC subprocesses), :mod:`.dag` (stage order),
:mod:`.experiments` (overrides, ``dvc exp``), :mod:`.tables` (metric tables); :mod:`.tasks` holds the
Prefect tasks the flows share, :mod:`.cli` the command line (``python -m pipeline.flows``).

Settings come from the ``flows:`` section of params.yaml (:class:`pipeline.flows.settings.FlowParams`). No
Prefect server is needed locally: ``python -m pipeline.flows run`` starts a temporary one
(:func:`start_temporary_server`, :mod:`.server`: one process at a time per ``PREFECT_HOME``, so flows
started side by side do not race on its SQLite database; call it first when you start flows from your
own Python processes side by side). Nothing
here is imported by the stages, and this package imports a flow (and Prefect) only when one is
asked for, so ``dvc repro`` never pays Prefect's start-up.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# A flow run with no server starts a temporary one. It would send usage data at start-up (no network
# at run time), and its default start-up limit is short for a busy small machine. Set here, before any
# flow module imports Prefect (every submodule import runs this first); an explicit user setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# public name -> the submodule that defines it (imported on first access)
_EXPORTS = {
    "pipeline_flow": "run",
    "sweep_flow": "sweep",
    "scenarios_flow": "scenarios",
    "study_flow": "study",
    "tuning_flow": "tuning",
    "rounds_flow": "rounds",
    "cluster_flow": "cluster",
    "kubernetes_job_template": "cluster",
    "StageFailed": "dvc_process",
    "StageTimeout": "dvc_process",
    "start_temporary_server": "server",
    "main": "cli",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
