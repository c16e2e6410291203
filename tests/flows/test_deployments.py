"""prefect.yaml: it parses, and every deployment's entrypoint is a file of pipeline/flows/ that defines
that flow (Prefect loads the file by its path)."""

from __future__ import annotations

import ast
import importlib

import yaml
from prefect import Flow
from repo_utils import PROJECT


def _is_flow_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, ast.Name) and target.id == "flow"


def test_prefect_yaml_entrypoints_define_their_flows():
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        file = PROJECT / path
        assert file.is_file() and file.parent == PROJECT / "pipeline" / "flows", dep["name"]
        # defined in that file (not only imported there), as a @flow
        defs = {n.name: n for n in ast.parse(file.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert func in defs and any(_is_flow_decorator(d) for d in defs[func].decorator_list), dep["name"]
        # and importable as the package module of that file, with the name Prefect shows
        module = importlib.import_module(".".join(file.relative_to(PROJECT).with_suffix("").parts))
        assert isinstance(getattr(module, func), Flow), dep["name"]
        # a file named like the top-level package would shadow it when Prefect loads it as a script
        assert file.stem != "pipeline", dep["name"]
