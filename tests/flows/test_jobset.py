"""The JobSet of a train stage across machines, without a cluster: ``prefect.yaml``'s ``k8s-multinode`` deployment
read by Prefect's own loader, its parameters validated against the flow's schema as the server does, the
JobSet built from them (with the Kubernetes client's models) and validated against the JobSet CRD's published
OpenAPI schema (a pinned copy, tests/flows/crds/), with no field the API server would prune. Then the env and
command of every pod, and following a JobSet to its end against a fake API: log lines, the completed case,
the failed case with its reason and the failed pod's log, a time limit, and the flow failing with the reason."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from flows.test_kubernetes_job import DEPLOY_ENV, SECRETS, build_job, container, k8s_deployments
from prefect.utilities.schema_tools import validate
from repo_utils import PROJECT, commit_git_dvc_repo, run

from pipeline.flows.cluster import kubernetes_job_template
from pipeline.flows.jobset import (
    FOLLOWER_JOB,
    GROUP,
    KIND,
    LEADER_JOB,
    PLURAL,
    VERSION,
    JobSetSettings,
    endpoint,
    jobset_manifest,
    jobset_name,
    node_script,
)
from pipeline.flows.jobset_watch import JobSetFailed, JobSetWatch, terminal_state

CRD = Path(__file__).with_name("crds") / "jobset.x-k8s.io_jobsets-v0.12.0.yaml"
DEPLOYMENT = "k8s-multinode"
PARAMS_TEXT = "train:\n  lr: 0.001\n"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["plural"], crd["spec"]["names"]["kind"]) == (GROUP, PLURAL, KIND)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    assert version["served"] and version["storage"]
    return version["schema"]["openAPIV3Schema"]


def pruned_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``value`` the API server would drop silently: keys a structural schema does not declare."""
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for k, v in value.items():
            if k not in schema["properties"]:
                out.append(f"{path}.{k}")
            else:
                out += pruned_fields(v, schema["properties"][k], f"{path}.{k}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            out += pruned_fields(v, schema["additionalProperties"], f"{path}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += pruned_fields(v, schema["items"], f"{path}[{i}]")
    return out


def check_against_crd(manifest: dict[str, Any]) -> None:
    schema = crd_schema()
    jsonschema.validate(manifest, schema)
    assert pruned_fields(manifest, schema) == []


@pytest.fixture
def deployment(monkeypatch) -> dict[str, Any]:
    for k, v in {**DEPLOY_ENV, **SECRETS}.items():
        monkeypatch.setenv(k, v)
    return k8s_deployments()[DEPLOYMENT]


def settings_of(deployment: dict[str, Any]) -> JobSetSettings:
    """The deployment's parameters as the server checks them (the flow's parameter schema), then the flow's."""
    from pipeline.flows.multinode import multinode_flow

    params = deployment["parameters"]
    validate(params, multinode_flow.parameters.model_dump(), raise_on_error=True, preprocess=True)
    return JobSetSettings(**params["jobset"])


def manifest_of(settings: JobSetSettings, variant: str = "dpo") -> dict[str, Any]:
    return jobset_manifest(
        settings,
        name=jobset_name(variant, "brisk-otter"),
        variant=variant,
        commit=COMMIT,
        params_text=PARAMS_TEXT,
        labels={"app.kubernetes.io/part-of": "dpo-pipeline"},
    )


def pods_of(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rj["name"]: rj["template"]["spec"]["template"]["spec"] for rj in manifest["spec"]["replicatedJobs"]}


def test_the_deployments_jobset_is_valid_against_the_crd(deployment):
    manifest = manifest_of(settings_of(deployment))
    check_against_crd(manifest)
    assert (manifest["apiVersion"], manifest["kind"]) == (f"{GROUP}/{VERSION}", KIND)
    assert manifest["metadata"]["namespace"] == "dpo"


def test_the_crd_check_catches_a_bad_jobset(deployment):
    manifest = manifest_of(settings_of(deployment))
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["replicatedJobs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        check_against_crd(bad)
    typo = json.loads(json.dumps(manifest))
    typo["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"]["nodeSelecter"] = {}
    assert pruned_fields(typo, crd_schema()) == [".spec.replicatedJobs[1].template.spec.template.spec.nodeSelecter"]


def test_every_pod_gets_the_rendezvous_the_remote_and_no_secret(deployment):
    s = settings_of(deployment)
    manifest = manifest_of(s)
    name = manifest["metadata"]["name"]
    text = json.dumps(manifest)
    for key, value in SECRETS.items():
        assert value not in text, f"the value of {key} (the deploying shell) is in the JobSet"
    assert len(name) <= 40 and f"{name}-{FOLLOWER_JOB}-0-{s.nnodes - 2}".__len__() <= 63
    spec = manifest["spec"]
    assert spec["network"] == {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": [LEADER_JOB]}
    assert spec["failurePolicy"] == {"maxRestarts": 0}
    jobs = {rj["name"]: rj for rj in spec["replicatedJobs"]}
    assert [jobs[LEADER_JOB]["replicas"], jobs[FOLLOWER_JOB]["replicas"]] == [1, 1]
    for job, pods in ((LEADER_JOB, 1), (FOLLOWER_JOB, s.nnodes - 1)):
        js = jobs[job]["template"]["spec"]
        # an Indexed job: each pod's JOB_COMPLETION_INDEX is its number among the job's pods
        assert (js["parallelism"], js["completions"], js["completionMode"], js["backoffLimit"]) == (
            pods,
            pods,
            "Indexed",
            0,
        )
    for job, pod in pods_of(manifest).items():
        (c,) = pod["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env == {
            "DPO_PIPELINE_REPO": DEPLOY_ENV["DPO_PIPELINE_REPO"],
            "DPO_PIPELINE_COMMIT": COMMIT,
            "DPO_PIPELINE_PARAMS": PARAMS_TEXT,
            "DVC_REMOTE_URL": DEPLOY_ENV["DVC_REMOTE_URL"],
            "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "DPO_PIPELINE_CACHE": "/tmp/dpo-pipeline/.cache/dpo-pipeline",
            "DPO_TRAIN_NNODES": "2",
            "DPO_TRAIN_NPROC": "8",
            "DPO_TRAIN_RDZV_ENDPOINT": f"{name}-leader-0-0.{name}:29400",
            "DPO_TRAIN_RDZV_ID": name,
        }, job
        assert c["envFrom"] == [{"secretRef": {"name": "dpo-pipeline", "optional": True}}]
        assert c["image"] == DEPLOY_ENV["DPO_PIPELINE_IMAGE"]
        assert c["resources"] == {"limits": {"nvidia.com/gpu": "8"}, "requests": {"cpu": "32", "memory": "256Gi"}}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["restartPolicy"] == "Never" and "nodeSelector" not in pod
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        assert c["command"][:2] == ["bash", "-c"]
    leader, follower = (pods_of(manifest)[j]["containers"][0] for j in (LEADER_JOB, FOLLOWER_JOB))
    assert leader["ports"] == [{"containerPort": 29400, "name": "rdzv"}] and "ports" not in follower
    assert (
        "dvc repro --pull train@dpo\n" in leader["command"][2]
        and "pipeline.training.follow" not in leader["command"][2]
    )
    assert "python -m pipeline.training.follow --variant dpo --pull" in follower["command"][2]
    assert "dvc repro" not in follower["command"][2]


def test_options_reach_the_jobset(deployment):
    s = settings_of(deployment).model_copy(
        update={
            "nnodes": 4,
            "gpus_per_node": 0,
            "queue_name": "team-a",
            "secret_name": None,
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {
                    "key": "dedicated",
                    "operator": "Equal",
                    "value": "train",
                    "effect": "NoSchedule",
                    "tolerationSeconds": 60,
                }
            ],
        }
    )
    manifest = manifest_of(s, variant="dpo_long")
    check_against_crd(manifest)
    assert manifest["metadata"]["name"].startswith("dpo-dpo-long-")
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for pod in pods_of(manifest).values():
        c = pod["containers"][0]
        assert "limits" not in c["resources"] and "envFrom" not in c  # CPU pods: no GPU key at all
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"][0]["tolerationSeconds"] == 60
    assert manifest["spec"]["replicatedJobs"][1]["template"]["spec"]["completions"] == 3


def test_the_node_scripts_are_valid_bash():
    for role in (LEADER_JOB, FOLLOWER_JOB):
        script = node_script(role, "dpo")
        assert subprocess.run(["bash", "-n", "-c", script], check=False).returncode == 0
        assert script.startswith("set -euo pipefail\n") and 'git checkout --quiet "$DPO_PIPELINE_COMMIT"' in script


def test_the_launchers_pod_is_a_small_cpu_pod_with_its_service_account(deployment):
    config, _ = build_job(
        kubernetes_job_template(), deployment["work_pool"]["job_variables"], DEPLOYMENT, "dpo-multinode"
    )
    job = config.job_manifest
    assert "nvidia.com/gpu" not in container(job)["resources"].get("limits", {})
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "dpo-jobset-launcher"
    assert endpoint("x", 1) == "x-leader-0-0.x:1"


# ------------------------------------------------------------------------------ following a JobSet (fake API)
def pod(name: str, phase: str, exit_code: int | None = None) -> Any:
    term = SimpleNamespace(exit_code=exit_code, reason="Error") if exit_code is not None else None
    status = SimpleNamespace(
        phase=phase, reason=None, container_statuses=[SimpleNamespace(state=SimpleNamespace(terminated=term))]
    )
    return SimpleNamespace(metadata=SimpleNamespace(name=name), status=status)


class FakeCluster:
    """The two clients JobSetWatch uses: the JobSet goes through ``states``; pods log ``logs`` (timestamped)."""

    def __init__(self, states: list[dict], pods: list[Any], logs: dict[str, list[str]]):
        self.states, self.pod_list, self.logs = states, pods, logs
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.reads = 0

    async def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == (GROUP, VERSION, PLURAL)
        self.created.append(body)

    async def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state = self.states[min(self.reads, len(self.states) - 1)]
        self.reads += 1
        return {"metadata": {"name": name}, "status": state}

    async def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)

    async def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector.startswith("jobset.sigs.k8s.io/jobset-name=")
        return SimpleNamespace(items=self.pod_list)

    async def read_namespaced_pod_log(self, name, namespace, timestamps, since_seconds):
        assert timestamps
        # every read returns the log so far (a window larger than the poll): lines repeat between reads
        return "\n".join(self.logs.get(name, [])[: 2 * self.reads])


def watch(cluster: FakeCluster, lines: list[str], timeout_s: float = 0) -> str:
    manifest = {"metadata": {"name": "dpo-dpo-x", "namespace": "dpo"}}
    w = JobSetWatch(cluster, cluster, manifest, lines.append, poll_s=0.01, tail_lines=2)
    return asyncio.run(w.run(timeout_s))


RUNNING: dict = {"conditions": [{"type": "StartupPolicyInProgress", "status": "True"}]}
LOGS = {
    "dpo-dpo-x-leader-0-0-abc": [
        "2026-01-01T00:00:01.5Z train step 1",
        "2026-01-01T00:00:02Z train step 2",
        "2026-01-01T00:00:02.000000001Z train step 3",
        "2026-01-01T00:00:03Z done",
    ],
    "dpo-dpo-x-follower-0-0-def": [
        "2026-01-01T00:00:01Z joined",
        "2026-01-01T00:00:04Z Traceback",
        "2026-01-01T00:00:05Z NodesDiffer: no",
    ],
}


def test_a_completed_jobset_returns_with_every_log_line_once():
    done = {
        "conditions": [
            {
                "type": "Completed",
                "status": "True",
                "reason": "AllJobsCompleted",
                "message": "jobset completed successfully",
            }
        ]
    }
    cluster = FakeCluster([RUNNING, RUNNING, done], [pod("dpo-dpo-x-leader-0-0-abc", "Succeeded")], LOGS)
    lines: list[str] = []
    assert watch(cluster, lines) == "AllJobsCompleted: jobset completed successfully"
    assert cluster.created and cluster.created[0]["metadata"]["name"] == "dpo-dpo-x"
    assert lines[1:] == [f"[leader-0-0-abc] {m}" for m in ("train step 1", "train step 2", "train step 3", "done")]


def test_a_failed_jobset_raises_its_reason_with_the_failed_pods_exit_and_log():
    failed = {
        "terminalState": "Failed",
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "FailedJobs",
                "message": "jobset failed due to one or more job failures",
            }
        ],
    }
    pods = [pod("dpo-dpo-x-follower-0-0-def", "Failed", 1), pod("dpo-dpo-x-leader-0-0-abc", "Running")]
    cluster = FakeCluster([RUNNING, failed], pods, LOGS)
    lines: list[str] = []
    with pytest.raises(JobSetFailed) as e:
        watch(cluster, lines)
    msg = str(e.value)
    assert msg.startswith("JobSet dpo/dpo-dpo-x failed: FailedJobs: jobset failed due to one or more job failures")
    assert (
        "pod follower-0-0-def: exit code 1 (Error); last lines of its log:\n    Traceback\n    NodesDiffer: no" in msg
    )
    assert "leader-0-0-abc:" not in msg  # running, not failed
    assert "[follower-0-0-def] NodesDiffer: no" in lines


def test_a_jobset_past_its_time_limit_is_deleted():
    cluster = FakeCluster([RUNNING], [], {})
    with pytest.raises(JobSetFailed, match=r"timed out after 0\.05 s; deleted it"):
        watch(cluster, [], timeout_s=0.05)
    assert cluster.deleted == ["dpo-dpo-x"]


def test_terminal_state_reads_conditions_and_terminal_state():
    assert terminal_state({}) == (None, "")
    assert terminal_state({"status": RUNNING}) == (None, "")
    assert terminal_state({"status": {"terminalState": "Completed"}}) == ("Completed", "")
    false = {"conditions": [{"type": "Failed", "status": "False", "reason": "X"}]}
    assert terminal_state({"status": false}) == (None, "")


# ------------------------------------------------------------------------------ the flow
TRAIN_DVC_YAML = """\
stages:
  train:
    foreach: [dpo, dpop]
    do:
      cmd: echo ${item} > ${item}.txt
      params: [train.lr]
      outs: ["${item}.txt"]
  other:
    cmd: echo x > other.txt
    outs: [other.txt]
"""


@pytest.fixture
def train_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(TRAIN_DVC_YAML)
    (repo / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    commit_git_dvc_repo(repo)
    return repo


def test_the_flow_runs_a_jobset_per_train_stage_and_fails_with_its_reason(
    prefect_harness, deployment, train_repo, monkeypatch
):
    from pipeline.flows import multinode

    seen: list[dict] = []

    async def fake_run_jobset(manifest, settings, timeout_s, tail_lines):
        seen.append(manifest)
        if len(seen) == 2:
            raise JobSetFailed(f"JobSet dpo/{manifest['metadata']['name']} failed: FailedJobs: a follower exited 1")
        return "AllJobsCompleted"

    monkeypatch.setattr(multinode, "run_jobset", fake_run_jobset)
    settings = settings_of(deployment)
    original = (train_repo / "params.yaml").read_text()
    with pytest.raises(JobSetFailed, match="FailedJobs: a follower exited 1"):
        multinode.multinode_flow(jobset=settings, overrides={"train.lr": 0.5}, repo=str(train_repo))
    assert [m["metadata"]["name"].split("-")[1] for m in seen] == ["dpo", "dpop"]
    env = {e["name"]: e["value"] for e in pods_of(seen[0])[LEADER_JOB]["containers"][0]["env"]}
    assert env["DPO_PIPELINE_COMMIT"] == run(["git", "rev-parse", "HEAD"], train_repo).strip()
    assert yaml.safe_load(env["DPO_PIPELINE_PARAMS"])["train"]["lr"] == 0.5  # the run's overrides
    assert (train_repo / "params.yaml").read_text() == original  # the checkout as it was
    with pytest.raises(ValueError, match="other must run elsewhere"):
        multinode.multinode_flow(jobset=settings, targets=["other"], repo=str(train_repo))


def test_the_cli_prints_the_jobsets_without_a_cluster(deployment, train_repo, tmp_path, capsys):
    from pipeline.flows.cli import main

    settings_file = tmp_path / "jobset.yaml"
    settings_file.write_text(yaml.safe_dump(deployment["parameters"]["jobset"]))
    main(["--repo", str(train_repo), "multinode", "--jobset", str(settings_file), "--print", "-S", "train.lr=0.25"])
    manifests = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [m["metadata"]["name"] for m in manifests] == ["dpo-dpo-manual", "dpo-dpop-manual"]
    for m in manifests:
        check_against_crd(m)
        env = {e["name"]: e["value"] for e in pods_of(m)[FOLLOWER_JOB]["containers"][0]["env"]}
        assert yaml.safe_load(env["DPO_PIPELINE_PARAMS"])["train"]["lr"] == 0.25
    with pytest.raises(ValueError, match="other must run elsewhere"):
        main(["--repo", str(train_repo), "multinode", "--jobset", str(settings_file), "--print", "other"])
