"""The JobSet that trains one ``train@<variant>`` across machines on Kubernetes (no cluster calls here).

A JobSet (``jobset.x-k8s.io/v1alpha2``, the controller Kubeflow Trainer's ``TrainJob`` builds on) of two
replicated jobs: ``leader``, one pod that runs the DVC stage (``dvc repro --pull train@<v>``, then pushes its
outputs and run-cache to the DVC remote), and ``follower``, ``nnodes - 1`` pods that each run
``python -m pipeline.training.follow --variant <v> --pull``. JobSet gives every pod a stable host name behind a
headless service, so the rendezvous endpoint is the leader's ``<jobset>-leader-0-0.<jobset>:<port>``. Its
success policy ends the JobSet when the leader's job completes (a stage restored from the run-cache trains
nothing, and the followers waiting for it are then stopped), and any failed pod fails it (no restarts: the
rerun resumes from the last checkpoint). With ``queue_name`` Kueue admits the pods together (gang scheduling).

Every pod clones the repository at the orchestrating flow's commit and writes the flow's params.yaml (its
overrides included), so all run the same code and params (:mod:`pipeline.training.node_check` verifies it
before the first step). Credentials of the DVC remote come from a Secret by reference, never by value.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.training.multinode import ENV

GROUP, VERSION, PLURAL, KIND = "jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"
LEADER_JOB, FOLLOWER_JOB = "leader", "follower"
CONTAINER = "train"
SHM = "dshm"
WORKDIR = "/tmp/dpo-pipeline"  # where each pod clones the repository


class JobSetSettings(BaseModel):
    """The multi-machine job of a ``train@<variant>`` stage: the ``jobset`` parameter of ``multinode_flow``
    (``prefect.yaml``'s ``k8s-multinode`` deployment sets it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1)  # an image with the project's dependencies and git
    image_pull_policy: str
    namespace: str
    repo: str = Field(min_length=1)  # the git repository the pods clone
    nnodes: int = Field(ge=2)  # machines (pods); one leader, the rest followers
    nproc_per_node: int = Field(ge=1)  # torchrun processes per pod
    gpus_per_node: int = Field(ge=0)  # nvidia.com/gpu limit per pod; 0: none at all
    cpu_request: str
    memory_request: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    rdzv_port: int = Field(ge=1, le=65535)  # the leader's c10d rendezvous port
    rdzv_timeout: int = Field(ge=1)  # seconds the pods wait for each other (train.runtime.rdzv_timeout)
    dvc_remote_url: str = Field(min_length=1)  # the DVC remote the pods pull inputs from and push outputs to
    secret_name: str | None  # a Secret whose keys become env vars (the DVC remote's credentials)
    queue_name: str | None  # a Kueue LocalQueue: admits all pods at once, or none
    finished_ttl: int = Field(ge=0)  # seconds a finished JobSet (and its pods' logs) is kept
    poll_s: float = Field(gt=0)  # how often the flow reads the JobSet's state and its pods' new log lines


def jobset_name(variant: str, run: str) -> str:
    """``dpo-<variant>-<run>`` as a DNS label short enough for JobSet's pod host names
    (``<jobset>-follower-0-<index>``, at most 63 characters)."""
    raw = re.sub(r"[^a-z0-9-]+", "-", f"dpo-{variant}-{run}".lower()).strip("-")
    return raw[:40].rstrip("-")


def endpoint(name: str, port: int) -> str:
    """The leader pod's rendezvous address: JobSet's DNS name of the ``leader`` job's pod 0."""
    return f"{name}-{LEADER_JOB}-0-0.{name}:{port}"


def node_script(role: str, variant: str) -> str:
    """What a pod runs: clone at the flow's commit, write its params, add the DVC remote, then lead or follow."""
    stage = f"train@{variant}"
    v = shlex.quote(variant)
    setup = [
        "set -euo pipefail",
        f'git clone --quiet "$DPO_PIPELINE_REPO" {WORKDIR}',
        f"cd {WORKDIR}",
        'git checkout --quiet "$DPO_PIPELINE_COMMIT"',
        'printf "%s" "$DPO_PIPELINE_PARAMS" > params.yaml',
        'dvc remote add --local --force --default shared "$DVC_REMOTE_URL"',
    ]
    if role == LEADER_JOB:
        work = [
            "dvc pull --run-cache --allow-missing",
            f"dvc repro --pull {shlex.quote(stage)}",
            "dvc push --run-cache",  # the stage and what it computed upstream, for the stages after it
        ]
    else:
        work = [f"python -m pipeline.training.follow --variant {v} --pull"]
    return "\n".join(setup + work) + "\n"


def pod_env(s: JobSetSettings, name: str, commit: str, params_text: str) -> dict[str, str]:
    """The env every pod gets (names and values: nothing from the deploying or orchestrating shell)."""
    return {
        "DPO_PIPELINE_REPO": s.repo,
        "DPO_PIPELINE_COMMIT": commit,
        "DPO_PIPELINE_PARAMS": params_text,
        "DVC_REMOTE_URL": s.dvc_remote_url,
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "DPO_PIPELINE_CACHE": f"{WORKDIR}/.cache/dpo-pipeline",
        ENV["nnodes"]: str(s.nnodes),
        ENV["nproc"]: str(s.nproc_per_node),
        ENV["rdzv_endpoint"]: endpoint(name, s.rdzv_port),
        ENV["rdzv_id"]: name,
    }


def job_template(s: JobSetSettings, role: str, pods: int, script: str, env: dict[str, str]) -> dict[str, Any]:
    """A batch/v1 JobTemplateSpec of ``pods`` indexed pods, built with the Kubernetes client's models."""
    from kubernetes_asyncio import client as k8s

    limits = {"nvidia.com/gpu": str(s.gpus_per_node)} if s.gpus_per_node else None
    container = k8s.V1Container(
        name=CONTAINER,
        image=s.image,
        image_pull_policy=s.image_pull_policy,
        command=["bash", "-c", script],
        env=[k8s.V1EnvVar(name=k, value=v) for k, v in env.items()],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.secret_name, optional=True))]
        if s.secret_name
        else None,
        ports=[k8s.V1ContainerPort(container_port=s.rdzv_port, name="rdzv")] if role == LEADER_JOB else None,
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": s.cpu_request, "memory": s.memory_request}, limits=limits
        ),
        volume_mounts=[k8s.V1VolumeMount(name=SHM, mount_path="/dev/shm")],
    )
    pod = k8s.V1PodSpec(
        containers=[container],
        # a container's /dev/shm is 64 MiB; NCCL's transport between the GPUs of a pod needs more
        volumes=[k8s.V1Volume(name=SHM, empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory"))],
        restart_policy="Never",
        node_selector=s.node_selector or None,
        tolerations=[k8s.V1Toleration(**_snake(t)) for t in s.tolerations] or None,
    )
    job = k8s.V1JobTemplateSpec(
        spec=k8s.V1JobSpec(
            parallelism=pods,
            completions=pods,
            completion_mode="Indexed",
            backoff_limit=0,
            template=k8s.V1PodTemplateSpec(spec=pod),
        )
    )
    return _pruned(job.to_dict(serialize=True))


def jobset_manifest(
    s: JobSetSettings, *, name: str, variant: str, commit: str, params_text: str, labels: dict[str, str]
) -> dict[str, Any]:
    """The JobSet of ``train@<variant>`` (see the module's docstring)."""
    env = pod_env(s, name, commit, params_text)
    meta_labels = {**labels, **({"kueue.x-k8s.io/queue-name": s.queue_name} if s.queue_name else {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": s.namespace, "labels": meta_labels},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [LEADER_JOB]},
            "failurePolicy": {"maxRestarts": 0},
            "ttlSecondsAfterFinished": s.finished_ttl,
            "replicatedJobs": [
                {
                    "name": LEADER_JOB,
                    "replicas": 1,
                    "template": job_template(s, LEADER_JOB, 1, node_script(LEADER_JOB, variant), env),
                },
                {
                    "name": FOLLOWER_JOB,
                    "replicas": 1,
                    "template": job_template(s, FOLLOWER_JOB, s.nnodes - 1, node_script(FOLLOWER_JOB, variant), env),
                },
            ],
        },
    }


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    """A manifest's camelCase keys as the client models' keyword arguments (``tolerationSeconds`` ->
    ``toleration_seconds``)."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in d.items()}


def _pruned(value: Any) -> Any:
    """The models' dict without the fields left unset (None), as the API server would store it."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value
