"""The cluster data path without Kubernetes: prefect.yaml's k8s-gpu-stages, k8s-cpu-stages and k8s-cluster
deployments (entrypoints, pull steps, parameters and env taken from the file) deployed onto a Prefect
``process`` work pool of the same name. A process worker runs every flow run in a fresh temporary folder,
so the ``git_clone`` pull step makes each run a "pod": a fresh clone of a bare git repository (the
``origin``), with the DVC remote a local folder. The repository holds the project's ``pipeline/`` package
and the shell pipeline of tests/flows/conftest.py, its stages split into a GPU segment (``first``) and a
CPU segment (``second@p``, ``second@q``, ``flaky``: fails once, its retry passes)."""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from flows.prefect_stack import PrefectStack
from repo_utils import PROJECT, run

from pipeline.flows.experiments import experiments

CLUSTER_DEPLOYMENTS = ("k8s-gpu-stages", "k8s-cpu-stages", "k8s-cluster")
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def process_pool_spec(cache_dir: Path) -> dict:
    """prefect.yaml with only the cluster deployments, each on a process work pool named like its
    Kubernetes pool: entrypoint, pull steps, parameters, tags and the env of its job variables as in the
    file; the Kubernetes-only job variables (image, namespace, GPUs, ...) dropped."""
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    deployments = []
    for dep in spec["deployments"]:
        if dep["name"] not in CLUSTER_DEPLOYMENTS:
            continue
        dep = copy.deepcopy(dep)
        env = {**dep["work_pool"]["job_variables"]["env"], "DPO_PIPELINE_CACHE": str(cache_dir)}
        dep["work_pool"] = {
            "name": dep["work_pool"]["name"],
            "work_queue_name": dep["work_pool"]["work_queue_name"],
            "job_variables": {"env": env},
        }
        dep.pop("schedules", None)
        deployments.append(dep)
    assert sorted(d["name"] for d in deployments) == sorted(CLUSTER_DEPLOYMENTS)
    assert len({d["work_pool"]["name"] for d in deployments}) == 1, "one pool (GPU and CPU pods differ in k8s only)"
    return {
        "name": spec["name"],
        "prefect-version": spec["prefect-version"],
        "build": None,
        "push": None,
        "deployments": deployments,
    }


def add_flows_code(repo: Path) -> Path:
    """The shell pipeline with the flows' code (what a pod clones), ``first`` on GPU pods and ``second`` on
    CPU pods, experiments pushed to ``origin`` (README: ``flows.git_remote: origin``)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["flows"].update(resources={"first": "gpu", "second": "cpu", "flaky": "cpu"}, git_remote="origin")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(PROJECT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    run(["git", "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "flows code, cluster settings"], repo)
    return repo


def test_cluster_deployments_name_the_remote_their_pods_add():
    """k8s pods get the DVC remote from the pull step (``dvc remote add ... shared``); the deployments that
    run stages or start them must pass that name (flows.remote is null in params.yaml), and every
    parameter must be one of the flow's."""
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        if dep["name"] not in ("k8s", *CLUSTER_DEPLOYMENTS):
            continue
        script = next(
            s["prefect.deployments.steps.run_shell_script"]["script"]
            for s in dep["pull"]
            if "prefect.deployments.steps.run_shell_script" in s
        )
        args = shlex.split(script.split("dvc remote add", 1)[1])
        added = next(a for a in args if not a.startswith("-"))  # the remote's name
        assert dep["parameters"].get("remote") == added, dep["name"]
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(".".join(Path(path).with_suffix("").parts))
        assert set(dep["parameters"]) <= set(getattr(module, func).parameters.properties), dep["name"]


def table(artifact: dict) -> list[dict]:
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.slow
def test_cluster_flow_segments_share_the_remote_and_push_the_experiment(tmp_path, shell_repo):
    repo = add_flows_code(shell_repo)
    bare = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    run(["git", "push", "-q", str(bare), "HEAD:refs/heads/main"], repo)  # prefect.yaml clones branch main
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    spec_file = tmp_path / "prefect-process.yaml"
    spec_file.write_text(yaml.safe_dump(process_pool_spec(tmp_path / "pipeline-cache"), sort_keys=False))
    pool = yaml.safe_load(spec_file.read_text())["deployments"][0]["work_pool"]["name"]
    # what `prefect deploy` writes into the job variables' env (prefect.yaml's header)
    deploy_env = {"DPO_PIPELINE_REPO": bare.as_uri(), "DVC_REMOTE_URL": str(remote)}
    # a pod's worker: no git identity of its own (HOME is empty), polls often
    home = tmp_path / "home"
    home.mkdir()
    worker_env = {"HOME": str(home), "PREFECT_WORKER_QUERY_SECONDS": "1", "DVC_NO_ANALYTICS": "1"}

    with PrefectStack(tmp_path / "prefect") as stack:
        stack.cli("work-pool", "create", pool, "--type", "process")
        stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(spec_file), cwd=repo, env=deploy_env)
        with stack.worker(pool, cwd=tmp_path, env=worker_env) as worker:
            res = stack.cli(
                "deployment",
                "run",
                "dpo-cluster/k8s-cluster",
                "--flow-run-name",
                "nightly",
                "--watch",
                "--watch-timeout",
                "900",
                check=False,
                timeout=960,
            )
        runs = {r["name"]: r for r in stack.flow_runs()}
        logs = {name: stack.flow_run_logs(r["id"]) for name, r in runs.items()}
        detail = (
            f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n"
            + "\n".join(f"--- {n} ({r['state_type']})\n{logs[n][-3000:]}" for n, r in runs.items())
            + f"\n--- worker\n{Path(worker.log_path).read_text()[-3000:]}"
        )
        assert res.returncode == 0 and runs["nightly"]["state_type"] == "COMPLETED", detail
        name_of = {r["id"]: n for n, r in runs.items()}
        stages = {name_of[a["flow_run_id"]]: table(a) for a in stack.artifacts("dpo-stages")}

    # the GPU pod ran `first` and pushed it; the CPU pod, a fresh clone, restored it from the remote's
    # run-cache instead of recomputing it, then ran its own stages
    assert set(runs) == {"nightly", "nightly-1-gpu", "nightly-2-cpu"}, detail
    assert {r["stage"]: r["status"] for r in stages["nightly-1-gpu"]} == {"first": "ran"}
    assert {r["stage"]: r["status"] for r in stages["nightly-2-cpu"]} == {
        "first": "restored",
        "second@p": "ran",
        "second@q": "ran",
        "flaky": "ran",
    }
    assert not (repo / "first.txt").exists()  # nothing ran in the source checkout

    # the remote holds the outputs and the run-cache
    md5 = hashlib.md5(b"first 1\n").hexdigest()
    assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert any((remote / "runs").rglob("*"))

    # the last segment recorded the run as an experiment and pushed it to origin
    refs = run(["git", "ls-remote", str(bare), "refs/exps/*"], tmp_path)
    assert refs.strip().endswith("/nightly"), refs

    # a third machine sees it
    clone = tmp_path / "laptop"
    run(["git", "clone", "-q", "-b", "main", bare.as_uri(), str(clone)], tmp_path)
    run(["dvc", "remote", "add", "--local", "--default", "shared", str(remote)], clone)
    assert "nightly" not in {e["name"] for e in experiments(clone)}
    run(["dvc", "exp", "pull", "origin", "nightly"], clone)
    exp = {e["name"]: e for e in experiments(clone)}["nightly"]
    assert exp["metrics"]["m_p.json:y"] == 2 and exp["params"]["a.x"] == 1
    assert "nightly" in run(["dvc", "exp", "show", "--csv"], clone)
    run(["dvc", "exp", "apply", "nightly"], clone)
    run(["dvc", "pull"], clone)
    assert (clone / "second_q.txt").read_text() == "first 1\n2\n"
    assert (clone / "flaky.txt").read_text() == "first 1\n2\nfirst 1\n2\n"
