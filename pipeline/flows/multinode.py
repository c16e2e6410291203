"""``multinode_flow``: ``train@<variant>`` stages across machines on Kubernetes, one JobSet each (deployment
``k8s-multinode``; ``cluster_flow`` sends it the train stages when ``flows.resources.train`` is ``multinode``).

Prefect's Kubernetes worker runs one ``batch/v1`` Job per flow run, one pod; a run across machines needs
its pods scheduled together and able to reach each other. So this flow's own pod (no GPU) creates a JobSet
(:mod:`pipeline.flows.jobset`) per stage, waits for it with its pods' log lines in the flow run's log, and
fails with the JobSet's reason and the failed pods' log tails (:mod:`pipeline.flows.jobset_watch`). The
JobSet's leader pod pushes the stage's outputs and run-cache to the DVC remote, where the stages after it find
them.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.flows.dag import expand_targets, stage_graph
from pipeline.flows.experiments import apply_overrides
from pipeline.flows.jobset import JobSetSettings, jobset_manifest, jobset_name
from pipeline.flows.settings import group_of, load_flow_params
from pipeline.flows.tasks import flow_run_name
from pipeline.settings.base import DEFAULT_PARAMS

TRAIN = "train"


def train_stages(root: Path, targets: list[str] | None) -> list[str]:
    """The ``train@<variant>`` stages of ``targets`` (default: every one); any other stage is refused."""
    nodes, _ = stage_graph(root)
    stages = expand_targets(targets or [TRAIN], nodes)
    other = [s for s in stages if group_of(s) != TRAIN]
    if other:
        raise ValueError(
            f"multinode_flow trains train@<variant> stages across machines; {', '.join(other)} "
            "must run elsewhere (flows.resources: train: multinode sends it only the train stages)"
        )
    return stages


def params_text(root: Path, overrides: dict[str, Any] | None) -> str:
    """params.yaml with ``overrides`` (``dvc exp run -S`` grammar), for the pods; the checkout is left as it was."""
    path = root / DEFAULT_PARAMS
    original = path.read_text(encoding="utf-8")
    try:
        apply_overrides(root, overrides)
        return path.read_text(encoding="utf-8")
    finally:
        path.write_text(original, encoding="utf-8")


def git_commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{root} is not a git checkout: the JobSet's pods clone the flow's commit ({proc.stderr})")
    return proc.stdout.strip()


async def run_jobset(manifest: dict[str, Any], settings: JobSetSettings, timeout_s: float, tail_lines: int) -> str:
    """Create and follow one JobSet with the cluster's credentials (in a pod: its service account)."""
    from prefect_kubernetes.credentials import KubernetesCredentials

    from pipeline.flows.jobset_watch import JobSetWatch

    creds = KubernetesCredentials()
    logger = get_run_logger()
    async with creds.get_client("custom_objects") as custom, creds.get_client("core") as core:
        watch = JobSetWatch(custom, core, manifest, logger.info, poll_s=settings.poll_s, tail_lines=tail_lines)
        return await watch.run(timeout_s)


@task(name="jobset-train", cache_policy=NO_CACHE, persist_result=False)
def train_across_machines(
    stage: str, settings: JobSetSettings, commit: str, params: str, timeout_s: float, tail_lines: int
) -> dict[str, Any]:
    """One ``train@<variant>`` as a JobSet of ``settings.nnodes`` pods; raises with the reason when it fails."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    variant = stage.split("@", 1)[1]
    name = jobset_name(variant, f"{uuid.uuid4().hex[:6]}-{flow_run_name()}")  # unique: JobSets outlive runs
    manifest = jobset_manifest(
        settings,
        name=name,
        variant=variant,
        commit=commit,
        params_text=params,
        labels={"app.kubernetes.io/part-of": "dpo-pipeline", "dpo-pipeline/stage": f"{TRAIN}-{variant}"},
    )
    reason = run_coro_as_sync(run_jobset(manifest, settings, timeout_s, tail_lines))
    get_run_logger().info("JobSet %s of %s completed: %s", name, stage, reason)
    return {"stage": stage, "jobset": name, "nodes": settings.nnodes, "result": reason}


@flow(name="dpo-multinode")
def multinode_flow(
    jobset: JobSetSettings,
    overrides: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    experiment: str | None = None,
    record: bool | None = None,
    remote: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """Train each ``train@<variant>`` of ``targets`` (default: every variant) across ``jobset.nnodes`` machines.

    jobset: the JobSet's image, machines, processes and GPUs per machine, rendezvous, DVC remote, ...
    overrides: params for this run (``{"train.variants.dpo.beta": 0.3}``), written into every pod's params.yaml.
    experiment, record, remote: as ``cluster_flow`` passes them to each segment; the pods use the JobSet's
        remote, and a later segment records the experiment.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    stages = train_stages(root, targets)
    if record:
        logger.info("experiment %s is recorded by a later segment: this flow only trains", experiment or "")
    if remote:
        logger.info("the pods use the JobSet's DVC remote %s (remote %s here)", jobset.dvc_remote_url, remote)
    params, commit = params_text(root, overrides), git_commit(root)
    results = []
    for stage in stages:
        timeout_s = fp.for_stage(stage).timeout_s
        t = train_across_machines.with_options(task_run_name=f"jobset-{stage}")
        results.append(t(stage, jobset, commit, params, timeout_s, fp.log_tail_lines))
    create_table_artifact(table=results, key="dpo-multinode", description="train stages run across machines")
    return {"stages": {r["stage"]: r for r in results}}
