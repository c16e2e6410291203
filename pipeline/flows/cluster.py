"""``cluster_flow``: the pipeline across CPU and GPU pods (deployment ``k8s-cluster``), and the
Kubernetes base job template of their work pool (``python -m pipeline.flows k8s-template``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prefect import flow, get_run_logger

from pipeline.flows.dag import segments, stage_order
from pipeline.flows.settings import load_flow_params
from pipeline.flows.tasks import flow_run_name

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun


@flow(name="dpo-cluster")
def cluster_flow(
    overrides: dict[str, Any] | None = None,
    targets: list[str] | None = None,
    experiment: str | None = None,
    record: bool | None = None,
    remote: str | None = None,
    repo: str = ".",
) -> dict[str, Any]:
    """The pipeline across machines: consecutive stages of one resource class (``flows.resources``) run
    as one flow run of that class's deployment (``flows.deployments``: CPU pods for prepare, judge,
    pairs, export, report; GPU pods for policy, sample, reference, train, evaluate; with
    ``flows.resources.train: multinode``, a JobSet across machines per train stage). The pods share
    ``remote`` (default ``flows.remote``; deployment ``k8s-cluster``: the pods' ``shared``): each segment
    restores upstream stages from the pushed run-cache, and the last segment records the experiment when
    ``record`` (default: when there are overrides or a name; ``k8s-cluster``: always, pods are thrown away)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    remote = remote if remote is not None else fp.remote
    if not remote:
        raise ValueError("cluster_flow needs a DVC remote the pods share: the remote parameter or flows.remote")
    do_record = record if record is not None else bool(overrides or experiment)
    order = stage_order(root, targets)
    segs = segments(order, fp.resource_of)
    name = experiment or flow_run_name()
    runs = []
    for i, (cls, stages) in enumerate(segs):
        last = i == len(segs) - 1
        deployment = fp.deployments[cls]
        logger.info("segment %d/%d on %s (%s): %s", i + 1, len(segs), deployment, cls, ", ".join(stages))
        # Prefect types it FlowRun | Coroutine (an async caller gets a coroutine); this flow is sync
        fr = cast(
            "FlowRun",
            run_deployment(
                deployment,
                parameters={
                    "overrides": overrides,
                    "targets": stages,
                    "remote": remote,
                    "record": last and do_record,
                    "experiment": name if last else None,
                },
                flow_run_name=f"{name}-{i + 1}-{cls}",
            ),
        )
        runs.append(
            {
                "segment": i + 1,
                "class": cls,
                "stages": stages,
                "flow_run": str(fr.id),
                "state": fr.state.name if fr.state else None,
            }
        )
        if not (fr.state and fr.state.is_completed()):
            raise RuntimeError(
                f"segment {i + 1} ({cls}: {', '.join(stages)}) ended {runs[-1]['state']}; see flow run {fr.id}"
            )
    return {"segments": runs}


def kubernetes_job_template(gpus: int = 0) -> dict[str, Any]:
    """prefect-kubernetes's default base job template (``KubernetesWorker.get_default_base_job_template``)
    plus the variables ``gpu_count`` (``nvidia.com/gpu`` limit of the pod), ``node_selector``,
    ``tolerations`` and ``secret_name`` (a Secret whose keys become env vars: DVC remote and git
    credentials). ``gpus`` is the pool's default for deployments that set no ``gpu_count``: 0 (the
    default) leaves the limit out, so CPU-only deployments omit ``gpu_count`` and GPU ones set it.
    ``prefect work-pool create <pool> --type kubernetes --base-job-template <file>``."""
    try:
        from prefect_kubernetes.worker import KubernetesWorker
    except ImportError as e:
        raise ImportError(
            "the Kubernetes job template needs prefect-kubernetes: pip install prefect-kubernetes "
            "(it is in this project's dev extra)"
        ) from e

    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    tpl = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # a variable with no value drops its key when Prefect renders the Job: CPU pods get no limit at all,
    # since even "nvidia.com/gpu: 0" counts as a GPU request (the ExtendedResourceToleration admission
    # plugin then adds a GPU-node toleration)
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["envFrom"] = [{"secretRef": {"name": "{{ secret_name }}", "optional": True}}]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    props = tpl["variables"]["properties"]
    props["gpu_count"] = {
        "title": "GPUs",
        "type": "integer",
        "minimum": 1,
        "description": "nvidia.com/gpu limit of the pod; leave it unset for CPU-only pods",
    }
    if gpus:
        props["gpu_count"]["default"] = gpus
    props["node_selector"] = {
        "title": "Node selector",
        "type": "object",
        "default": {},
        "description": 'e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
    }
    props["tolerations"] = {
        "title": "Tolerations",
        "type": "array",
        "items": {"type": "object"},
        "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpus else [],
    }
    props["secret_name"] = {
        "title": "Secret with env vars",
        "type": "string",
        "default": "dpo-pipeline",
        "description": "Kubernetes Secret: DVC remote credentials (e.g. AWS_*), GIT token",
    }
    return tpl
