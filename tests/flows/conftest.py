"""Fixtures of the flow tests: one `prefect_test_harness` per session, a throwaway git + DVC repo whose
stages are shell commands, the ``flows:`` section of the project's params.yaml to build settings
from, and queries of the Prefect API (artifacts, task runs) and of ``dvc exp show``."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from repo_utils import commit_git_dvc_repo, repo_params

from pipeline.settings.base import merged


def project_flows(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``flows:`` section of the project's params.yaml with ``overrides`` merged in."""
    return merged(repo_params()["flows"], overrides or {})


@pytest.fixture
def flows_section() -> Callable[..., dict[str, Any]]:
    """``flows_section({"stages": ...})``: params.yaml's flows section with the overrides merged in."""
    return project_flows


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server + database for the whole session."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    # the project's settings for a temporary server (no telemetry: its start-up write raced the
    # harness's own migrations, "database is locked") apply before this server starts, as in a flow run;
    # pipeline.flows sets them in the environment, so it is imported (for that alone) before Prefect
    import pipeline.flows  # noqa: F401

    # isort: split
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _task_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


@pytest.fixture
def artifacts(prefect_harness) -> Callable[[str], list]:
    """``artifacts(key)``: the Prefect artifacts with that key."""
    return _artifacts


@pytest.fixture
def latest_artifact(prefect_harness) -> Callable[[str], Any]:
    """``latest_artifact(key)``: the newest Prefect artifact with that key."""
    return lambda key: max(_artifacts(key), key=lambda a: a.created)


@pytest.fixture
def task_runs(prefect_harness) -> Callable[[str], list]:
    """``task_runs(name)``: the Prefect task runs of that name."""
    return _task_runs


@pytest.fixture
def exp_names() -> Callable[[Path], set[str]]:
    """``exp_names(repo)``: the names of the repo's DVC experiments."""
    from pipeline.flows.experiments import experiments

    return lambda repo: {e["name"] for e in experiments(repo)}


SHELL_DVC_YAML = textwrap.dedent("""\
    stages:
      first:
        cmd: echo "first ${a.x}" > first.txt && echo "first says hello"
        params: [a.x]
        outs: [first.txt]
      second:
        foreach: [p, q]
        do:
          cmd: >-
            cat first.txt > second_${item}.txt && echo "${b.y}" >> second_${item}.txt &&
            echo '{"y": ${b.y}}' > m_${item}.json
          deps: [first.txt]
          params: [b.y]
          outs:
            - second_${item}.txt
          metrics:
            - m_${item}.json:
                cache: false
      flaky:
        cmd: >-
          if [ ! -f ${marker} ]; then touch ${marker}; echo "flaky: the first try fails"; exit 1; fi;
          cat second_p.txt second_q.txt > flaky.txt
        deps: [second_p.txt, second_q.txt]
        outs: [flaky.txt]
    """)


def shell_params_text(root: Path) -> str:
    """params.yaml of the shell pipeline (``flaky``'s marker under ``root``), with a comment the override
    round-trip must keep."""
    params = {
        "a": {"x": 1},
        "b": {"y": 2},
        "marker": str(root / "flaky.marker"),
        "flows": project_flows(
            {
                "defaults": {"retries": 0, "retry_delay_s": 0},
                "stages": {"flaky": {"retries": 1}, "bad": {"timeout_s": 60}},
                "log_tail_lines": 5,
                "sweep": {"metrics": ["m_*.json:y"]},
            }
        ),
    }
    return "# shell pipeline\n" + yaml.safe_dump(params, sort_keys=False)


@pytest.fixture
def shell_params(tmp_path) -> Path:
    """The shell pipeline's params.yaml alone (no git, no DVC), in a folder of its own."""
    (tmp_path / "params.yaml").write_text(shell_params_text(tmp_path))
    return tmp_path


def new_shell_repo(root: Path) -> Path:
    """A git + DVC repo under ``root`` whose stages are shell commands (`flaky` fails on its first try
    only), committed."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(SHELL_DVC_YAML)
    (repo / "params.yaml").write_text(shell_params_text(root))
    commit_git_dvc_repo(repo)
    return repo


@pytest.fixture
def shell_repo(tmp_path_factory) -> Path:
    """A fresh shell-pipeline repo per test: no test depends on what another left in it."""
    return new_shell_repo(tmp_path_factory.mktemp("shellflows"))


@pytest.fixture
def shell_repos(tmp_path_factory) -> Callable[[int], list[Path]]:
    """``shell_repos(n)``: n fresh shell-pipeline repos."""
    return lambda n: [new_shell_repo(tmp_path_factory.mktemp("shellflows")) for _ in range(n)]
