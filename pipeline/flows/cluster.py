"""``cluster_flow``: the pipeline across CPU and GPU pods (deployment ``k8s-cluster``), and the
Kubernetes base job template of their work pool (``python -m pipeline.flows k8s-template``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipeline.config import load_flow_params
from pipeline.flows.dag import segments, stage_order
from pipeline.flows.tasks import flow_run_name


@flow(name="dpo-cluster")
def cluster_flow(overrides: dict[str, Any] | None = None, targets: list[str] | None = None,
                 experiment: str | None = None, repo: str = ".") -> dict[str, Any]:
    """The pipeline across machines: consecutive stages of one resource class (``flows.resources``) run
    as one flow run of that class's deployment (``flows.deployments``: CPU pods for prepare, judge,
    pairs, report; GPU pods for policy, sample, reference, train, evaluate). The pods share
    ``flows.remote``: each segment restores upstream stages from the pushed run-cache, and the last
    segment records the experiment."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    root = Path(repo).resolve()
    fp = load_flow_params(root)
    if not fp.remote:
        raise ValueError("cluster_flow needs flows.remote: the DVC remote the pods share")
    order = stage_order(root, targets)
    segs = segments(order, fp.resource_of)
    name = experiment or flow_run_name()
    runs = []
    for i, (cls, stages) in enumerate(segs):
        last = i == len(segs) - 1
        deployment = fp.deployments[cls]
        logger.info("segment %d/%d on %s (%s): %s", i + 1, len(segs), deployment, cls, ", ".join(stages))
        fr = run_deployment(deployment, parameters={"overrides": overrides, "targets": stages, "record": last and bool(
            overrides or experiment), "experiment": name if last else None}, flow_run_name=f"{name}-{i + 1}-{cls}")
        runs.append({"segment": i + 1, "class": cls, "stages": stages, "flow_run": str(fr.id),
                     "state": fr.state.name if fr.state else None})
        if not (fr.state and fr.state.is_completed()):
            raise RuntimeError(f"segment {i + 1} ({cls}: {', '.join(stages)}) ended {runs[-1]['state']}; "
                               f"see flow run {fr.id}")
    return {"segments": runs}


def kubernetes_job_template(gpus: int = 1) -> dict[str, Any]:
    """Prefect's default Kubernetes base job template (bundled with Prefect) plus GPU requests: the
    variables ``gpu_count`` (``nvidia.com/gpu`` limit, ``gpus`` unless a deployment sets it; 0 for CPU stages),
    ``node_selector``, ``tolerations`` and ``secret_name`` (a Secret whose keys become env vars: DVC
    remote and git credentials). ``prefect work-pool create <pool> --type kubernetes --base-job-template <file>``."""
    import prefect

    meta = (Path(prefect.__file__).parent / "server" / "api" / "collections_data" / "views"
            / "aggregate-worker-metadata.json")
    tpl = copy.deepcopy(json.loads(meta.read_text())["prefect-kubernetes"]["kubernetes"]
                        ["default_base_job_configuration"])
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["envFrom"] = [{"secretRef": {"name": "{{ secret_name }}", "optional": True}}]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    props = tpl["variables"]["properties"]
    props["gpu_count"] = {"title": "GPUs", "type": "integer", "default": gpus, "minimum": 0,
                          "description": "nvidia.com/gpu limit of the pod (0 for CPU-only stages)"}
    props["node_selector"] = {"title": "Node selector", "type": "object", "default": {},
                              "description": "e.g. {\"nvidia.com/gpu.product\": \"NVIDIA-H100-80GB-HBM3\"}"}
    props["tolerations"] = {"title": "Tolerations", "type": "array", "items": {"type": "object"},
                            "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    props["secret_name"] = {"title": "Secret with env vars", "type": "string", "default": "dpo-pipeline",
                            "description": "Kubernetes Secret: DVC remote credentials (e.g. AWS_*), GIT token"}
    return tpl
