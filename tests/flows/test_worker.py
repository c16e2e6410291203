"""The deployments on a real Prefect stack on loopback, the way the README's "One GPU machine (process
worker)" section runs them: ``prefect server start``, a ``process`` work pool, ``prefect deploy -n gpu-box``
from prefect.yaml, ``prefect worker start``, ``prefect deployment run --watch``; results checked through
the server's REST API. Then an interval schedule the worker runs unasked, a worker killed (SIGKILL, with
its process group) half-way through a stage, and a stage that keeps failing.

All slow (a server start, CLI calls and a worker are tens of seconds each here; the tiny pipeline
minutes): ``python -m pytest tests/flows/test_worker.py -m slow -p no:randomly``. One server serves the
module; each test makes its own repo, work pool and deployment and stops its own worker.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from flows.prefect_stack import PrefectStack, kill_tree
from repo_utils import PROJECT, commit_git_dvc_repo, make_repo, repo_params, run, tiny_params

from pipeline.settings.base import merged

pytestmark = pytest.mark.slow

DEPLOYMENT = "dpo-pipeline/gpu-box"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # the scheduler looks for due deployments every 2 s instead of 60, so an interval schedule shows soon
    with PrefectStack(
        tmp_path_factory.mktemp("prefect"), server_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    ) as s:
        yield s


# ============================================================================================ helpers
def commit_prefect_yaml(repo: Path) -> Path:
    """The project's prefect.yaml in ``repo``, committed (the checkout a process worker runs in)."""
    shutil.copy(PROJECT / "prefect.yaml", repo / "prefect.yaml")
    run(["git", "add", "prefect.yaml"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "prefect.yaml"], repo)
    return repo


def shell_repo(root: Path, dvc_yaml: str, params: dict, stages: dict | None = None) -> Path:
    """A git + DVC checkout whose stages are shell commands, with the project's pipeline/ (the flows)
    and prefect.yaml: what a deployment needs, with stages that take seconds."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(dvc_yaml)
    flows = merged(
        repo_params()["flows"],
        {"defaults": {"retries": 0, "retry_delay_s": 0}, "stages": stages or {}, "log_tail_lines": 5},
    )
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "flows": flows}, sort_keys=False))
    shutil.copytree(PROJECT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".gitignore").write_text("*.count\n*.started\n")
    commit_git_dvc_repo(repo)
    return commit_prefect_yaml(repo)


def deploy(stack: PrefectStack, repo: Path, pool: str, *extra: str) -> dict[str, str]:
    """A process work pool ``pool`` and the gpu-box deployment of ``repo`` on it, as the README does
    (DPO_PIPELINE_DIR set, ``prefect deploy -n gpu-box``). Returns the environment of its worker."""
    env = {"DPO_PIPELINE_DIR": str(repo)}
    stack.cli("work-pool", "create", pool, "--type", "process", cwd=repo, env=env)
    stack.cli("--no-prompt", "deploy", "-n", "gpu-box", "--pool", pool, *extra, cwd=repo, env=env)
    return env


def run_deployment(
    stack: PrefectStack, repo: Path, env: dict[str, str], timeout: float = 3000, check: bool = True
) -> tuple[str, str]:
    """``prefect deployment run dpo-pipeline/gpu-box --watch``: the flow run's id and the CLI's output."""
    res = stack.cli("deployment", "run", DEPLOYMENT, "--watch", cwd=repo, env=env, timeout=timeout, check=check)
    out = res.stdout + res.stderr
    m = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert m, out[-3000:]
    return m.group(1), out


def flow_run(stack: PrefectStack, run_id: str) -> dict:
    return stack.api("GET", f"/flow_runs/{run_id}").json()


def deployment_runs(stack: PrefectStack, deployment_id: str) -> list[dict]:
    return stack.api(
        "POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    ).json()


def artifacts(stack: PrefectStack, run_id: str) -> dict[str, dict]:
    """The artifacts of a flow run, by key."""
    arts = stack.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    return {a["key"]: a for a in arts}


def stage_statuses(stack: PrefectStack, run_id: str) -> dict[str, str]:
    """What each DVC stage did in a flow run (its dpo-stages artifact)."""
    rows = artifacts(stack, run_id)["dpo-stages"]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    return {r["stage"]: r["status"] for r in rows}


def logs(stack: PrefectStack, run_id: str) -> str:
    """The run log of a flow run (its tasks' lines included), as the server keeps it."""
    out, offset = [], 0
    while True:
        page = stack.api(
            "POST",
            "/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "offset": offset, "limit": 200},
        ).json()
        out += [r["message"] for r in page]
        if len(page) < 200:
            return "\n".join(out)
        offset += len(page)


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 1.0):
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def processes_in(folder: Path) -> list[psutil.Process]:
    """The live processes whose working directory is ``folder`` (DVC and the stage commands it runs)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and Path(p.cwd()) == folder:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# ============================================================================================ tests
def test_deployment_run_by_worker_tiny_pipeline(stack, tmp_path, tiny_model_dir):
    """README walkthrough on the tiny config: pool, deploy, worker, `deployment run --watch`."""
    repo = commit_prefect_yaml(make_repo(tmp_path, tiny_params(tiny_model_dir)))
    env = deploy(stack, repo, "gpu-box")
    with stack.worker("gpu-box", cwd=repo, env=env):
        run_id, out = run_deployment(stack, repo, env)
    assert "Flow run finished successfully in 'Completed'" in out, out[-3000:]

    fr = flow_run(stack, run_id)
    assert fr["state_type"] == "COMPLETED" and fr["work_pool_name"] == "gpu-box", fr["state"]
    dep = stack.api("GET", f"/deployments/name/{DEPLOYMENT}").json()
    assert fr["deployment_id"] == dep["id"] and dep["job_variables"]["env"]["DPO_PIPELINE_DIR"] == str(repo)
    # every stage ran once in the checkout, DVC agrees it is all up to date, and the run's artifacts
    statuses = stage_statuses(stack, run_id)
    assert {"prepare", "sample", "train@dpo", "evaluate@dpop", "report"} <= set(statuses)
    assert set(statuses.values()) == {"ran"}, statuses
    assert set(artifacts(stack, run_id)) == {"dpo-report", "dpo-metrics", "dpo-stages"}
    assert "| dpo |" in artifacts(stack, run_id)["dpo-report"]["data"]
    for rel in ("data/pairs.parquet", "models/dpo/config.json", "metrics/eval/dpop.json", "reports/main/report.md"):
        assert (repo / rel).is_file(), rel
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo)
    tasks = stack.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    assert {t["name"] for t in tasks} == set(statuses) and {t["state_type"] for t in tasks} == {"COMPLETED"}
    assert "stage train@dpo: ran" in logs(stack, run_id)


SHELL_STAGES = textwrap.dedent("""\
    stages:
      first:
        cmd: echo run >> first.count && echo "first ${x}" > first.txt
        params: [x]
        outs: [first.txt]
      second:
        cmd: touch second.started && sleep ${sleep_s} && cat first.txt > second.txt
        deps: [first.txt]
        params: [sleep_s]
        outs: [second.txt]
    """)


def test_interval_schedule_runs_unasked(stack, tmp_path):
    """`prefect deploy -n gpu-box --interval 10`: the scheduler makes runs, the worker runs them."""
    repo = shell_repo(tmp_path, SHELL_STAGES, {"x": 1, "sleep_s": 0})
    env = deploy(stack, repo, "sched-box", "--interval", "10")
    # one run at a time in a checkout (runs that overlap meet on DVC's lock); scheduled runs wait their turn
    stack.cli("work-pool", "set-concurrency-limit", "sched-box", "1", cwd=repo, env=env)
    dep = stack.api("GET", f"/deployments/name/{DEPLOYMENT}").json()

    def ours(*states: str) -> list[dict]:  # this pool's runs (an earlier test may have run this deployment)
        return [
            r
            for r in deployment_runs(stack, dep["id"])
            if r["work_pool_name"] == "sched-box" and (not states or r["state_type"] in states)
        ]

    try:
        # --interval adds to prefect.yaml's nightly cron
        assert sorted(s["schedule"].get("interval") or 0 for s in dep["schedules"]) == [0, 10.0]
        with stack.worker("sched-box", cwd=repo, env=env):
            # no `deployment run`: two runs the schedule made, finished by the worker
            wait_for("two scheduled runs completed", lambda: ours("COMPLETED")[1:], timeout=600)
            stack.cli("deployment", "delete", DEPLOYMENT, cwd=repo, env=env)  # no more runs
            # a flow run outlives its worker (its own session): let the one under way finish first
            wait_for("no run under way", lambda: not ours("PENDING", "RUNNING"), timeout=300)
        runs = ours("COMPLETED")
        assert len(runs) >= 2 and all(r["auto_scheduled"] for r in ours())
        statuses = [stage_statuses(stack, r["id"]) for r in sorted(runs, key=lambda r: r["start_time"])]
        assert statuses[0] == {"first": "ran", "second": "ran"}
        assert all(s == {"first": "skipped", "second": "skipped"} for s in statuses[1:])
        assert (repo / "first.count").read_text().count("run") == 1
    finally:
        stack.cli("deployment", "delete", DEPLOYMENT, cwd=repo, env=env, check=False)  # no more runs


def test_worker_killed_mid_stage_next_run_finishes(stack, tmp_path):
    """The machine dies (SIGKILL to the worker, the flow run and DVC under it) while `second` runs: the
    next run of the deployment skips `first` and finishes `second`."""
    repo = shell_repo(tmp_path, SHELL_STAGES, {"x": 1, "sleep_s": 30})
    env = deploy(stack, repo, "kill-box")
    worker = stack.start_worker("kill-box", cwd=repo, env=env)
    out = stack.cli("deployment", "run", DEPLOYMENT, cwd=repo, env=env).stdout
    killed_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    wait_for("stage second started", (repo / "second.started").exists, timeout=600, every=0.5)
    killed = kill_tree(worker)
    assert len(killed) >= 4  # worker, flow run, DVC, the stage's shell (and its sleep)
    left = [" ".join(p.cmdline()) for p in processes_in(repo)]
    assert not left, left
    assert (repo / "first.count").read_text().count("run") == 1 and not (repo / "second.txt").exists()
    killed_state = flow_run(stack, killed_id)["state_type"]

    with stack.worker("kill-box", cwd=repo, env=env):
        run_id, out = run_deployment(stack, repo, env)
    assert flow_run(stack, run_id)["state_type"] == "COMPLETED", out[-3000:]
    assert stage_statuses(stack, run_id) == {"first": "skipped", "second": "ran"}
    assert (repo / "first.count").read_text().count("run") == 1 and (repo / "second.txt").read_text() == "first 1\n"
    # Prefect's server has no zombie detection of its own: the killed run stays Running (README)
    after = flow_run(stack, killed_id)["state_type"]
    print(f"killed flow run: {killed_state} right after the kill, {after} after the next run")
    assert killed_state == after == "RUNNING", (killed_state, after)


def test_failing_stage_fails_the_flow_run(stack, tmp_path):
    """A stage that keeps failing, with a retry from flows.stages: the run is Failed on the server and
    its log names the stage and quotes the stage's last lines."""
    dvc_yaml = SHELL_STAGES + textwrap.indent(
        textwrap.dedent("""\
        bad:
          cmd: echo "bad is about to fail" && exit 3
          deps: [second.txt]
          outs: [bad.txt]
        """),
        "  ",
    )
    repo = shell_repo(tmp_path, dvc_yaml, {"x": 1, "sleep_s": 0}, stages={"bad": {"retries": 1}})
    env = deploy(stack, repo, "fail-box")
    with stack.worker("fail-box", cwd=repo, env=env):
        run_id, out = run_deployment(stack, repo, env, check=False)
    fr = flow_run(stack, run_id)
    assert fr["state_type"] == "FAILED", (fr["state"], out[-3000:])
    assert "DVC stage 'bad' failed" in fr["state"]["message"], fr["state"]["message"]
    text = logs(stack, run_id)
    # the stage's name, why, and its log's tail (at most flows.log_tail_lines = 5 lines)
    assert re.search(
        r"DVC stage 'bad' failed \(its command exited with 3\); last [1-5] lines of its log:\n"
        r"(.*\n)*.*bad is about to fail",
        text,
    ), text[-3000:]
    [bad] = stack.api(
        "POST",
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"name": {"any_": ["bad"]}}},
    ).json()
    assert bad["run_count"] == 2 and bad["state_type"] == "FAILED"  # the retry of flows.stages.bad
    # the stages before it are done and stay done
    assert "up to date" in run(["dvc", "status", "first", "second"], repo)
