"""The Prefect tasks (one DVC stage, one DVC experiment) and what the flows share around them:
running stages in order with their retries and timeouts, running experiments a few at a time,
the shared remote (pull the run-cache, push experiments), and the artifacts of a run."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture

from pipeline.flows.dag import stage_graph
from pipeline.flows.dvc_process import StageFailed, repro_stage, run_dvc
from pipeline.flows.experiments import exp_push, exp_run_temp, override_args, taken_names
from pipeline.flows.settings import FlowParams, StageTaskSettings, group_of
from pipeline.flows.tables import metrics_rows


# ============================================================================================ tasks
@task(name="dvc-stage", cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, repo: str, timeout_s: float, tail_lines: int, remote: str | None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``; its output lines go to the Prefect run log. Prefect caching is
    off on purpose: whether the stage reruns is DVC's decision, on every try. With ``remote``, missing
    inputs are pulled from it first and the stage's outputs and run-cache pushed to it after."""
    logger = get_run_logger()
    run = repro_stage(repo, stage, logger.info, timeout_s=timeout_s, tail_lines=tail_lines, pull=bool(remote))
    if remote:
        push = run_dvc(["push", "-r", remote, "--run-cache", stage], repo, logger.info, tail_lines=tail_lines)
        if push.returncode:
            raise StageFailed(stage, push.returncode, push.tail, what="push of stage")
    status = run.statuses.get(stage, "skipped")
    logger.info("stage %s: %s (%.1f s)", stage, status, run.seconds)
    return {"stage": stage, "status": status, "seconds": round(run.seconds, 2)}


@task(name="dvc-experiment", cache_policy=NO_CACHE, persist_result=False)
def dvc_experiment(
    name: str, repo: str, overrides: dict[str, Any], targets: list[str], timeout_s: float, tail_lines: int
) -> dict[str, Any]:
    """One ``dvc exp run --temp`` experiment (a sweep or scenario point)."""
    logger = get_run_logger()
    logger.info("experiment %s: %s", name, " ".join(override_args(overrides)))
    run = exp_run_temp(repo, name, overrides, targets, logger.info, timeout_s=timeout_s, tail_lines=tail_lines)
    return {"name": name, "overrides": overrides, "statuses": run.statuses, "seconds": round(run.seconds, 2)}


def stage_task(stage: str, fp: FlowParams, label: str = "") -> tuple[Any, StageTaskSettings]:
    """:func:`dvc_stage` with the retries of ``stage`` (``flows.defaults`` / ``flows.stages``), and the
    stage's settings."""
    s = fp.for_stage(stage)
    return dvc_stage.with_options(
        name=f"{label}{stage}", task_run_name=f"{label}{stage}", retries=s.retries, retry_delay_seconds=s.retry_delay_s
    ), s


def run_stages(root: Path, order: list[str], fp: FlowParams, remote: str | None, label: str = "") -> dict[str, dict]:
    """Stages one after the other (DVC locks the workspace anyway); the first failure (after its
    retries) raises and stops the flow, earlier stages' outputs stay committed in the DVC cache."""
    results: dict[str, dict] = {}
    for stage in order:
        t, s = stage_task(stage, fp, label)
        results[stage] = t(stage, str(root), s.timeout_s, fp.log_tail_lines, remote)
    return results


def wait_any(futures: list) -> None:
    """Block until one of the task futures has finished."""
    while True:
        for f in futures:
            f.wait(timeout=0.5)
            if f.state.is_final():
                return


@dataclass(frozen=True)
class Schedule:
    """How a batch of experiments runs: at most ``parallel`` at once, each with ``retries`` and a
    ``timeout_s`` (0: none); with ``warm_start`` the first runs alone, so the stages every experiment
    shares land in DVC's run-cache once."""

    parallel: int
    warm_start: bool
    retries: int
    timeout_s: float

    @classmethod
    def of(cls, settings: Any) -> Schedule:
        """From a flow's settings section (``max_parallel``, ``retries``, ``timeout_s``), warm-started."""
        return cls(settings.max_parallel, True, settings.retries, settings.timeout_s)


def run_experiments(
    root: Path, fp: FlowParams, points: Mapping[str, dict[str, Any]], targets: list[str], schedule: Schedule
) -> list[str]:
    """One ``dvc exp run --temp`` task per point (experiment name -> the params it sets), as ``schedule``
    says. Each finished experiment is pushed (``flows.git_remote``). Returns the names of the experiments
    that failed."""
    names = list(points)
    taken = taken_names(root, names)
    if taken:
        raise ValueError(
            f"experiment names already taken: {', '.join(taken)}; choose another name (-n) or "
            "remove them (dvc exp remove)"
        )
    exp_task = dvc_experiment.with_options(retries=schedule.retries)
    futures: list[PrefectFuture[Any]] = []
    pending: list[PrefectFuture[Any]] = []
    for i, (exp, point) in enumerate(points.items()):
        if len(pending) >= schedule.parallel:
            wait_any(pending)
            pending = [f for f in pending if not f.state.is_final()]
        fut = exp_task.with_options(task_run_name=exp).submit(
            exp, str(root), point, targets, schedule.timeout_s, fp.log_tail_lines
        )
        futures.append(fut)
        pending.append(fut)
        if i == 0 and schedule.warm_start and len(points) > 1:
            fut.wait()  # its stages go to the run-cache before the other points start
    failed = []
    for exp, fut in zip(names, futures):
        fut.wait()
        if not fut.state.is_completed():
            failed.append(exp)
        else:
            push_experiment(root, fp, exp)
    return failed


def check_evaluate_targets(root: Path, variants: list[str], flow: str) -> list[str]:
    """``evaluate@<v>`` for each variant, failing before any experiment runs when one is not a stage."""
    nodes, _ = stage_graph(root)
    targets = [f"evaluate@{v}" for v in variants]
    unknown = [t for t in targets if t not in nodes]
    if unknown:
        known = sorted(n.split("@", 1)[1] for n in nodes if group_of(n) == "evaluate" and "@" in n)
        raise ValueError(
            f"{flow}: no stage {', '.join(unknown)}: not in train.variants (known: {', '.join(known) or 'none'})"
        )
    return targets


# ============================================================================================ helpers
def flow_run_name(fallback: str = "local") -> str:
    """The current Prefect flow run's name, made safe for a DVC experiment name (``fallback`` outside
    a flow run)."""
    try:
        from prefect.runtime import flow_run

        name = flow_run.name
    except Exception:  # noqa: BLE001  (outside a flow run)
        name = None
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name or fallback).strip("-") or fallback


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "artifact"


def publish(root: Path, fp: FlowParams, results: Mapping[str, dict], experiment: str | None) -> None:
    """The report and the metrics table as Prefect artifacts."""
    logger = get_run_logger()
    summary = [{"stage": s, "status": r["status"], "seconds": r["seconds"]} for s, r in results.items()]
    report = root / fp.report
    if report.is_file():
        create_markdown_artifact(
            markdown=report.read_text(encoding="utf-8"),
            key="dpo-report",
            description=f"{fp.report}" + (f" (experiment {experiment})" if experiment else ""),
        )
    try:
        rows = metrics_rows(root)
    except RuntimeError as e:
        logger.warning("no metrics table: %s", e)
        rows = []
    if rows:
        create_table_artifact(
            table=rows,
            key="dpo-metrics",
            description="dvc metrics show" + (f" (experiment {experiment})" if experiment else ""),
        )
    create_table_artifact(table=summary, key="dpo-stages", description="what each DVC stage did in this run")


def pull_run_cache(root: Path, fp: FlowParams, remote: str | None) -> None:
    """With a shared remote (other machines ran stages): fetch DVC's run-cache so that stages they ran
    are restored instead of recomputed."""
    if not remote:
        return
    logger = get_run_logger()
    pull = run_dvc(
        ["pull", "-r", remote, "--run-cache", "--allow-missing"], root, logger.info, tail_lines=fp.log_tail_lines
    )
    if pull.returncode:
        logger.warning(
            "dvc pull of the run-cache from %s failed (exit %d); stages may recompute", remote, pull.returncode
        )


def push_experiment(root: Path, fp: FlowParams, name: str | None) -> None:
    """``dvc exp push`` of a recorded experiment to ``flows.git_remote`` (when set)."""
    if name and fp.git_remote:
        exp_push(root, fp.git_remote, name, get_run_logger().info, tail_lines=fp.log_tail_lines)
