"""pipeline/flows/__init__.py: a light package. Its flows are re-exported lazily, so the DVC plumbing
imports without Prefect; no module of the package imports one that imports it back; and a flow's
temporary Prefect server gets safe settings unless the user set them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from repo_utils import PROJECT

FLOWS = PROJECT / "pipeline" / "flows"


def _python(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=PROJECT)
    return out.stdout.strip().splitlines()[-1]


def test_light_modules_do_not_import_prefect_and_flows_are_reexported():
    code = (
        "import sys\n"
        "import pipeline.flows, pipeline.flows.dag, pipeline.flows.experiments, pipeline.flows.tables\n"
        "import pipeline.flows.dvc_process, pipeline.flows.cli\n"
        "light = 'prefect' not in sys.modules\n"
        "from pipeline.flows import (pipeline_flow, sweep_flow, scenarios_flow, study_flow, rounds_flow,\n"
        "                            cluster_flow, kubernetes_job_template, StageFailed, main)\n"
        "from prefect import Flow\n"
        "flows = [pipeline_flow, sweep_flow, scenarios_flow, study_flow, rounds_flow, cluster_flow]\n"
        "print(light, all(isinstance(f, Flow) for f in flows), [f.name for f in flows])"
    )
    assert _python(code) == (
        "True True ['dpo-pipeline', 'dpo-sweep', 'dpo-scenarios', 'dpo-study', 'dpo-rounds', 'dpo-cluster']"
    )
    from pipeline import flows

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flows.nope  # noqa: B018


def _imports(path) -> set[str]:
    """The pipeline.flows modules that ``path`` imports at module level (function bodies excluded)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline.flows":
                out |= {f"pipeline.flows.{a.name}" for a in node.names}
            elif node.module.startswith("pipeline.flows."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline.flows.")}
    return out


def test_no_import_cycles():
    graph = {f"pipeline.flows.{p.stem}": _imports(p) for p in FLOWS.glob("*.py") if p.stem != "__init__"}
    assert _imports(FLOWS / "__init__.py") == set()  # the package imports its modules lazily only
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "False 120"),
        (
            {"PREFECT_SERVER_ANALYTICS_ENABLED": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "30"},
            "True 30",
        ),
    ],
)
def test_flows_set_temporary_server_defaults_unless_set(env, expected):
    """The temporary Prefect server a flow starts sends no usage data (no network at run time) and gets
    120 s to start; a user's own settings win."""
    keys = ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    e = {k: v for k, v in os.environ.items() if k not in keys} | env
    code = (
        "import pipeline.flows; from prefect.settings import get_current_settings; s = get_current_settings(); "
        "print(s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds)"
    )
    assert _python(code, e) == expected
