"""The Kubernetes Job of every k8s deployment, built by Prefect's own code: prefect.yaml loaded and its
``{{ $VAR }}`` placeholders filled in as ``prefect deploy`` does, the job variables validated as the
server does on deployment creation, and the Job manifest made by prefect-kubernetes's worker
configuration (``from_template_and_values`` + ``prepare_for_flow_run``) from our base job template
(pipeline/flows/cluster.py). No cluster, no server, no flow run."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import pytest
from prefect.cli.deploy._config import (
    _extract_variable,
    _load_deploy_configs_and_actions,
    _merge_with_default_deploy_config,
)
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import Flow, FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate
from prefect.utilities.templating import apply_values, find_placeholders
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
from repo_utils import PROJECT
from rich.console import Console

from pipeline.flows.cluster import kubernetes_job_template

POOL = "k8s-gpu"
# nvidia.com/gpu limit each k8s deployment must get (None: no GPU limit at all)
EXPECTED_GPUS = {
    "k8s": 1,
    "k8s-gpu-stages": 1,
    "k8s-sweep": 1,
    "k8s-rounds": 1,
    "k8s-cpu-stages": None,
    "k8s-cluster": None,
    "k8s-multinode": None,  # the pod that starts the JobSet; its GPUs are the JobSet's (test_jobset.py)
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# what `prefect deploy` reads from the shell (prefect.yaml's header)
DEPLOY_ENV = {
    "DPO_PIPELINE_IMAGE": "registry.test/dpo-pipeline:t-1234",
    "DPO_PIPELINE_REPO": "https://git.test/org/dpo-pipeline.git",
    "DVC_REMOTE_URL": "s3://bucket-test/dpo-pipeline",
}
# secrets in the environment of whoever deploys / runs the worker: none may reach a manifest
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIA-TEST-7f3a9c",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value-5d81e2",
    "OPENAI_API_KEY": "sk-test-openai-c0ffee",
    "GIT_TOKEN": "ghp-test-token-9b2d44",
    "HF_TOKEN": "hf-test-token-31a7",
}
# a client for an address nothing listens on: the template holds no block or variable references, so
# Prefect must not call it (if it did, the test would fail on the connection)
OFFLINE = PrefectClient(api="http://127.0.0.1:9/api")


@pytest.fixture
def deploy_env(monkeypatch):
    for k, v in {**DEPLOY_ENV, **SECRETS}.items():
        monkeypatch.setenv(k, v)


def k8s_deployments() -> dict[str, dict[str, Any]]:
    """prefect.yaml's deployments of the k8s pool, name -> deploy config, read by Prefect's own loader
    and with ``{{ $VAR }}`` filled in from os.environ as ``prefect deploy`` does."""
    configs, _ = _load_deploy_configs_and_actions(PROJECT / "prefect.yaml", console=Console(quiet=True))
    assert configs, "prefect.yaml did not load (Prefect's loader prints why and skips it)"
    out = {}
    for cfg in configs:
        cfg = apply_values(_merge_with_default_deploy_config(cfg), os.environ, remove_notset=False)
        if cfg["work_pool"]["name"] == POOL:
            out[cfg["name"]] = cfg
    return out


def used_placeholders(template: dict[str, Any]) -> set[str]:
    return {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}


def validate_job_variables(template: dict[str, Any], job_variables: dict[str, Any]) -> None:
    """What the server checks when a deployment is created (prefect.server.api.validation)."""
    validate(
        job_variables,
        template["variables"],
        raise_on_error=True,
        preprocess=True,
        ignore_required=True,
        allow_none_with_default=True,
    )


def build_job(
    template: dict[str, Any], job_variables: dict[str, Any], deployment: str = "k8s", flow_name: str = "dpo-pipeline"
) -> tuple[KubernetesWorkerJobConfiguration, FlowRun]:
    """The worker's job configuration for one flow run of ``deployment``, as the Kubernetes worker
    prepares it before creating the Job."""
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=OFFLINE)
    )
    flow = Flow(id=uuid.uuid4(), name=flow_name)
    run = FlowRun(id=uuid.uuid4(), name="brisk-otter", flow_id=flow.id)
    dep = DeploymentResponse(id=uuid.uuid4(), name=deployment, flow_id=flow.id, job_variables=job_variables)
    config.prepare_for_flow_run(run, dep, flow)
    return config, run


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("gpus", [0, 1])
def test_every_template_variable_is_used_and_declared(gpus):
    tpl = kubernetes_job_template(gpus)
    declared = set(tpl["variables"]["properties"])
    used = used_placeholders(tpl)
    # a declared variable no placeholder uses is ignored silently; a placeholder with no variable renders away
    assert declared - used == set(), "template variables not referenced in job_configuration"
    assert used - declared == set(), "placeholders in job_configuration with no declared variable"
    is_valid_schema(tpl["variables"], preprocess=False)
    defaults = {k: v["default"] for k, v in tpl["variables"]["properties"].items() if "default" in v}
    validate_job_variables(tpl, defaults)


def test_unused_variable_check_catches_one():
    tpl = kubernetes_job_template()
    tpl["variables"]["properties"]["gpu_type"] = {"type": "string", "default": "H100"}
    tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] = "{{ img }}"
    used = used_placeholders(tpl)
    assert set(tpl["variables"]["properties"]) - used == {"gpu_type", "image"}
    assert used - set(tpl["variables"]["properties"]) == {"img"}


def test_prefect_yaml_sets_only_declared_job_variables(deploy_env):
    deployments = k8s_deployments()
    assert set(deployments) == set(EXPECTED_GPUS)
    tpl = kubernetes_job_template()
    declared = set(tpl["variables"]["properties"])
    for name, cfg in deployments.items():
        job_variables = cfg["work_pool"]["job_variables"]
        assert set(job_variables) - declared == set(), f"{name}: job variables the template does not declare"
        validate_job_variables(tpl, job_variables)


@pytest.mark.parametrize("name", sorted(EXPECTED_GPUS))
def test_job_manifest_of_each_k8s_deployment(deploy_env, name):
    cfg = k8s_deployments()[name]
    jv = cfg["work_pool"]["job_variables"]
    config, run = build_job(kubernetes_job_template(), jv, name, cfg["entrypoint"].split(":")[1])
    job = config.job_manifest
    text = json.dumps(job)
    c = container(job)
    pod = job["spec"]["template"]["spec"]

    assert find_placeholders(text) == set(), "unrendered placeholders in the Job"
    for key, value in SECRETS.items():
        assert value not in text, f"the value of {key} (deploy/worker environment) is in the Job"
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["namespace"] == config.namespace == "dpo"
    assert job["spec"]["ttlSecondsAfterFinished"] == jv["finished_job_ttl"] == 3600
    assert c["image"] == DEPLOY_ENV["DPO_PIPELINE_IMAGE"] and c["imagePullPolicy"] == "IfNotPresent"
    # the image's entrypoint runs Prefect's flow-run command (the pull steps clone the repo)
    assert "command" not in c and c["args"] == ["prefect", "flow-run", "execute"]

    gpus = EXPECTED_GPUS[name]
    limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
    if gpus is None:
        # no key at all: even a limit of 0 is a request of nvidia.com/gpu (see kubernetes_job_template)
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
        assert GPU_TOLERATION not in pod["tolerations"]
    else:
        assert limits["nvidia.com/gpu"] == gpus == jv["gpu_count"]
        assert GPU_TOLERATION in pod["tolerations"]
    assert requests == {"cpu": jv["cpu_request"], "memory": jv["memory_request"]}
    assert isinstance(pod["nodeSelector"], dict) and isinstance(pod["tolerations"], list)
    assert all(isinstance(t, dict) for t in pod["tolerations"])

    # credentials come from the Secret, by reference
    assert c["envFrom"] == [{"secretRef": {"name": jv["secret_name"], "optional": True}}]
    assert jv["secret_name"] == "dpo-pipeline"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert all(isinstance(v, str) for v in env.values())
    assert (
        env.items()
        >= {
            **jv["env"],
            "DPO_PIPELINE_REPO": DEPLOY_ENV["DPO_PIPELINE_REPO"],
            "DVC_REMOTE_URL": DEPLOY_ENV["DVC_REMOTE_URL"],
        }.items()
    )
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id) and env["PREFECT__FLOW_ID"] == str(run.flow_id)
    assert env["PREFECT__DEPLOYMENT_NAME"] == name
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(run.id)


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_pool_default_applies_to_deployments_without_gpu_count(gpus):
    config, _ = build_job(kubernetes_job_template(gpus), {"image": "registry.test/x:1"})
    pod = config.job_manifest["spec"]["template"]["spec"]
    limits = container(config.job_manifest)["resources"].get("limits", {})
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus and pod["tolerations"] == [GPU_TOLERATION]
    else:
        assert "nvidia.com/gpu" not in limits and pod["tolerations"] == []


def test_zero_gpu_count_is_rejected_at_deploy_time():
    with pytest.raises(ValidationError, match="gpu_count"):
        validate_job_variables(kubernetes_job_template(), {"gpu_count": 0})


def test_node_selector_from_the_deploy_command_line():
    tpl = kubernetes_job_template()
    selector = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # `prefect deploy --job-variable '{"node_selector": {...}}'`: a JSON object, rendered as one
    jv = _extract_variable(json.dumps({"node_selector": selector}))
    validate_job_variables(tpl, jv)
    config, _ = build_job(tpl, {**jv, "gpu_count": 1})
    assert config.job_manifest["spec"]["template"]["spec"]["nodeSelector"] == selector
    # `--job-variable node_selector='{...}'` is key=value: a string, which the server refuses
    with pytest.raises(ValidationError, match="node_selector"):
        validate_job_variables(tpl, _extract_variable("node_selector=" + json.dumps(selector)))


def test_cli_prints_the_template(capsys):
    from pipeline.flows.cli import main

    main(["k8s-template", "--gpus", "2"])
    assert json.loads(capsys.readouterr().out) == kubernetes_job_template(2)
    assert kubernetes_job_template() == kubernetes_job_template(0)
    with pytest.raises(ValueError, match="gpus"):
        kubernetes_job_template(-1)
